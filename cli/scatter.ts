// sgm scatter: runs on the host being emptied.

import type { CAC } from "cac";
import { SgmError } from "../core/errors.ts";

export function registerScatter(cli: CAC, _signal: AbortSignal): void {
  cli
    .command("scatter", "Evict VMs from this host: read their migration streams and scatter the pages to the gather and relays")
    .usage("scatter --to HOST:PORT --vm NAME=QMP_SOCKET [--vm ...] --psk-file FILE [options]")
    .option("--to <host:port>", "Address of the gather on the destination host")
    .option("--vm <name=qmp>", "A VM to evict: its name (as the gather knows it) and its QMP socket (repeatable)")
    .option("--via <host:port,...>", "Relays to place pages on when the gather cannot take them yet (repeatable)")
    .option("--replicas <n>", "Relays that hold each relayed page", { default: 1 })
    .option("--psk-file <file>", "File holding the pre-shared key of this run's sgm processes")
    .option("--keep-source", "Leave the source QEMU paused after eviction instead of quitting it")
    .option("--json", "Print the final report as JSON on stdout")
    .example("sgm scatter --to dst:7700 --vm web1=/run/qemu/web1.qmp --via r1:7701,r2:7701 --psk-file /etc/sgm/psk")
    .action(async () => {
      throw new SgmError("internal", "scatter is not built yet");
    });
}
