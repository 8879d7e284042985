// Parses the command line with cac, hands the work to a subcommand (each a
// thin layer over its core engine) and turns the outcome into an exit code.

import { cac } from "cac";
import { SgmError } from "../core/errors.ts";
import { registerCheck } from "./check.ts";
import { registerEvacuate } from "./evacuate.ts";
import { registerGather } from "./gather.ts";
import { runHoldMonitor } from "./hold-monitor.ts";
import { reportError } from "./output.ts";
import { registerRelay } from "./relay.ts";
import { registerScatter } from "./scatter.ts";
import { Signals } from "./signals.ts";
import { WIRE_VERSION } from "../core/wire/frames.ts";
import { VERSION } from "./version.ts";

export async function main(argv: string[]): Promise<number> {
  // a gather's helper, not an operator's command: kept out of the help, and SIGTERM ends it
  if (argv[0] === "hold-monitor") return runHoldMonitor(argv.slice(1));
  const cli = cac("sgm");
  cli.usage("<scatter|relay|gather|evacuate|check> [options]\n\n  Scatter-Gather live migration: evict QEMU/KVM virtual machines from a host fast,\n  even when the destination is slow to receive them.");
  const signals = new Signals();
  registerScatter(cli, signals.stop);
  registerEvacuate(cli, signals.stop);
  registerCheck(cli, signals.stop);
  registerRelay(cli, signals);
  registerGather(cli, signals.stop);
  cli.help();

  if (argv.length === 1 && (argv[0] === "--version" || argv[0] === "-v")) {
    // sgm processes speak to each other only at the same wire protocol: operators compare this
    process.stdout.write(`sgm ${VERSION} (wire protocol ${WIRE_VERSION})\n`);
    return 0;
  }
  try {
    cli.parse(["", "", ...argv], { run: false });
    if (cli.options.help) return 0;
    if (!cli.matchedCommand) {
      if (cli.args.length > 0) throw new SgmError("usage", `unknown command '${cli.args[0]}' (try sgm --help)`);
      cli.outputHelp();
      return 2;
    }
    const code: unknown = await cli.runMatchedCommand();
    return typeof code === "number" ? code : 0;
  } catch (err) {
    if (err instanceof Error && err.name === "CACError") return reportError(new SgmError("usage", err.message));
    return reportError(err);
  }
}
