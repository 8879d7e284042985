// sgm's entry point. The first process only runs sgm again with the
// allocator setting (cli/allocator.ts) and waits, so it never loads the
// commands' modules: loading them is most of what a process's start costs.

import { runWithTunedAllocator } from "./allocator.ts";

const tuned = await runWithTunedAllocator(process.argv.slice(2));
process.exitCode = tuned ?? (await (await import("./commands.ts")).main(process.argv.slice(2)));
// Sockets or timers a failed run left behind must not keep the process alive.
process.exit();
