// sgm evacuate: empties this host, each VM to its own destination's gather,
// in one run: one relay set and one progress display, one summary.

import type { CAC } from "cac";
import { type EvacuationReport, runEvacuation } from "../core/scatter/evacuation.ts";
import { formatBytes } from "../core/units.ts";
import { parseCount } from "./args.ts";
import { addEvictionOptions, type EvictionFlags, parseEvictionFlags } from "./eviction-flags.ts";
import { parseTargets, type TargetFlags } from "./evacuate-targets.ts";
import { formatMs, info, printJson, setQuiet } from "./output.ts";
import { withProgress } from "./progress.ts";
import { addRelayOptions, parseRelayFlags, readKey, type RelayFlags } from "./run-flags.ts";

interface EvacuateFlags extends TargetFlags, RelayFlags, EvictionFlags {
  maxInFlight?: unknown;
  json?: boolean;
  quiet?: boolean;
}

export function registerEvacuate(cli: CAC, signal: AbortSignal): void {
  const command = cli
    .command("evacuate", "Empty this host: evict every VM named to its own destination's gather, largest first, in one run")
    .usage("evacuate (--map FILE | --to HOST:PORT (--vm NAME=QMP_SOCKET ... | --qmp-dir DIR)) --psk-file FILE [options]")
    .option("--map <file>", "The VMs and where each goes: one `NAME QMP_SOCKET GATHER_HOST:PORT` a line (# starts a comment)")
    .option("--to <host:port>", "The gather every VM named with --vm or --qmp-dir goes to")
    .option("--vm <name=qmp>", "A VM to evict: its name (as its gather knows it) and its QMP socket (repeatable)")
    .option("--qmp-dir <dir>", "Evict the VM behind every unix socket in this directory, named for the file (web1.qmp is web1)")
    .option("--max-in-flight <n>", "VMs migrating at once, largest first; the others wait their turn (default: all)");
  addEvictionOptions(addRelayOptions(command))
    .option("--json", "Print the final report as JSON on stdout")
    .option("--quiet", "Print no progress and no report lines on stderr; warnings and errors still")
    .example("sgm evacuate --map /etc/sgm/evacuate.map --via-file /etc/sgm/relays --max-in-flight 4 --psk-file /etc/sgm/psk")
    .example("sgm evacuate --qmp-dir /run/qemu --to dst:7700 --psk-file /etc/sgm/psk")
    .action(async (flags: EvacuateFlags) => {
      const targets = parseTargets(flags);
      const relays = parseRelayFlags(flags);
      const eviction = parseEvictionFlags(flags);
      const maxInFlight = flags.maxInFlight === undefined ? undefined : parseCount("--max-in-flight", flags.maxInFlight, 1, 10_000);
      setQuiet(Boolean(flags.quiet));
      const keys = readKey(flags);
      const report = await withProgress("scattered", Boolean(flags.quiet), (onProgress) =>
        runEvacuation({ ...relays, ...eviction, targets, maxInFlight, ...keys, signal, log: info, onProgress }),
      );
      render(report);
      if (flags.json) printJson(report);
      return report.exitCode;
    });
}

function render(report: EvacuationReport): void {
  for (const vm of report.vms) {
    if (vm.ok) {
      info(`${vm.name} → ${vm.to}: evicted after ${formatMs(vm.evictedAfterMs ?? 0)}; source ${vm.source}`);
    } else {
      info(`${vm.name} → ${vm.to}: NOT evicted: ${vm.error}; the VM is ${vm.source} at the source`);
    }
  }
  const h = report.host;
  const emptied = h.emptiedAfterMs === null ? `${h.failed} of ${h.vms} VMs still here` : `host empty after ${formatMs(h.emptiedAfterMs)}`;
  info(`evacuated ${h.evicted} of ${h.vms} VMs to ${report.destinations.length} destination${report.destinations.length === 1 ? "" : "s"}: ${emptied}; read ${formatBytes(h.bytesFromSources)} from the sources, dedup saved ${formatBytes(h.dedupSavedBytes)}`);
}
