// sgm gather: runs on the destination host.

import type { CAC } from "cac";
import { SgmError } from "../core/errors.ts";

export function registerGather(cli: CAC, _signal: AbortSignal): void {
  cli
    .command("gather", "Receive VMs: gather their pages and feed destination QEMUs waiting with -incoming defer")
    .usage("gather --listen HOST:PORT --vm NAME=QMP_SOCKET [--vm ...] --psk-file FILE [options]")
    .option("--listen <host:port>", "Address to listen on for the scatter")
    .option("--vm <name=qmp>", "A VM to receive: its name and the QMP socket of its destination QEMU (repeatable)")
    .option("--psk-file <file>", "File holding the pre-shared key of this run's sgm processes")
    .option("--json", "Print the final report as JSON on stdout")
    .example("sgm gather --listen 0.0.0.0:7700 --vm web1=/run/qemu/web1-in.qmp --psk-file /etc/sgm/psk")
    .action(async () => {
      throw new SgmError("internal", "gather is not built yet");
    });
}
