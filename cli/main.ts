// sgm's entry point. The first process only runs sgm again with the
// runtime's settings (cli/runtime-settings.ts) and waits, so it never loads the
// commands' modules: loading them is most of what a process's start costs.

import { asSgmError } from "../core/errors.ts";
import { runWithRuntimeSettings } from "./runtime-settings.ts";

const tuned = await runWithRuntimeSettings(process.argv.slice(2));
process.exitCode = tuned ?? (await runCommands());
// Sockets or timers a failed run left behind must not keep the process alive.
process.exit();

/**
 * The commands, or one line on what kept their modules from loading (the
 * page digest's native code, which no other digest can stand in for), in
 * plain text: the output module is among those that did not load.
 */
async function runCommands(): Promise<number> {
  let commands: typeof import("./commands.ts");
  try {
    commands = await import("./commands.ts");
  } catch (err) {
    const e = asSgmError(err);
    process.stderr.write(`sgm: error: ${e.message}\n`);
    return e.exitCode;
  }
  return commands.main(process.argv.slice(2));
}
