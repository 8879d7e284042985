// sgm relay: runs on an intermediary host with spare memory.

import type { CAC } from "cac";
import { SgmError } from "../core/errors.ts";

export function registerRelay(cli: CAC, _signal: AbortSignal): void {
  cli
    .command("relay", "Hold pages in memory for gathers that cannot take them yet")
    .usage("relay --listen HOST:PORT --capacity SIZE --psk-file FILE [options]")
    .option("--listen <host:port>", "Address to listen on")
    .option("--capacity <size>", "Memory to hold pages in, e.g. 8GiB")
    .option("--psk-file <file>", "File holding the pre-shared key of this run's sgm processes")
    .option("--json", "Print the final report as JSON on stdout")
    .example("sgm relay --listen 0.0.0.0:7701 --capacity 8GiB --psk-file /etc/sgm/psk")
    .action(async () => {
      throw new SgmError("internal", "relay is not built yet");
    });
}
