// `sgm hold-monitor QMP SOCKET`: not for operators to run. A gather starts
// one per VM, in a session of its own (core/qmp/monitor-holder.ts says
// why), so that no signal meant for the gather's process group reaches it.
// It prints one line, "ready" or what went wrong, and nothing more: whoever
// read it may be gone. SIGTERM ends it; SIGINT and SIGHUP do not, as a
// stopped gather's VMs may need it for a --resume.

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
