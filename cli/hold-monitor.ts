// `sgm hold-monitor QMP SOCKET`: not for operators to run. A gather starts
// one per VM (core/qmp/monitor-holder.ts says why); it prints one line,
// "ready" or what went wrong, and then nothing more: whoever read it may be
// gone. It ignores the terminal's SIGINT and SIGHUP, which reach the
// gather's whole process group: a gather stopped after switchover leaves
// its VMs to a --resume, which needs the holder.

import { holdMonitor } from "../core/qmp/monitor-holder.ts";
import { parseQmpAddress } from "../core/qmp/client.ts";

export async function runHoldMonitor(args: string[]): Promise<number> {
  if (args.length !== 2) {
    process.stdout.write("usage: sgm hold-monitor QMP SOCKET (started by sgm gather)\n");
    return 2;
  }
  for (const signal of ["SIGINT", "SIGHUP"] as const) process.on(signal, () => {});
  return holdMonitor(parseQmpAddress(args[0]!), args[1]!, (line) => process.stdout.write(`${line}\n`));
}
