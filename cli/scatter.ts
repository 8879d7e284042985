// sgm scatter: runs on the host being emptied.

import type { CAC } from "cac";
import { planScatter, runScatter, type ScatterReport } from "../core/scatter/engine.ts";
import { shortfallError } from "../core/scatter/survey.ts";
import { addEvictionOptions, type EvictionFlags, parseEvictionFlags } from "./eviction-flags.ts";
import { renderPlan } from "./plan-output.ts";
import { addRunOptions, parseRunFlags, readKey, type RunFlags } from "./run-flags.ts";
import { formatBytes } from "../core/units.ts";
import { formatMs, info, printJson, setQuiet } from "./output.ts";
import { withProgress } from "./progress.ts";

interface ScatterFlags extends RunFlags, EvictionFlags {
  plan?: boolean;
  json?: boolean;
  quiet?: boolean;
}

export function registerScatter(cli: CAC, signal: AbortSignal): void {
  addEvictionOptions(
    addRunOptions(
      cli
        .command("scatter", "Evict VMs from this host: read their migration streams and scatter the pages to the gather and relays")
        .usage("scatter --to HOST:PORT --vm NAME=QMP_SOCKET [--vm ...] --psk-file FILE [options]"),
    ),
  )
    .option("--plan", "Check the VMs, measure the gather and relays, print which relays the run would use and why, and exit: 0 if it would start, 78 if the relays are short of memory, 69 if too few are reachable. Moves nothing")
    .option("--json", "Print the final report as JSON on stdout")
    .option("--quiet", "Print no progress and no report lines on stderr; warnings and errors still")
    .example("sgm scatter --to dst:7700 --vm web1=/run/qemu/web1.qmp --via r1:7701,r2:7701 --psk-file /etc/sgm/psk")
    .action(async (flags: ScatterFlags) => {
      const run = parseRunFlags(flags);
      const eviction = parseEvictionFlags(flags);
      setQuiet(Boolean(flags.quiet));
      const common = { ...run, ...readKey(flags), signal, log: info };
      if (flags.plan) {
        const plan = await planScatter(common);
        renderPlan(plan);
        if (flags.json) printJson(plan);
        return shortfallError(plan)?.exitCode ?? 0;
      }
      const report = await withProgress("scattered", Boolean(flags.quiet), (onProgress) => runScatter({ ...common, ...eviction, onProgress }));
      render(report);
      if (flags.json) printJson(report);
      return report.exitCode;
    });
}

function render(report: ScatterReport): void {
  for (const vm of report.vms) {
    if (vm.ok) {
      info(
        `${vm.name}: evicted in ${formatMs(vm.evictionMs ?? 0)} (${vm.switchover} switchover after ${vm.passes} passes), downtime ${vm.downtimeMs === null ? "unknown" : formatMs(vm.downtimeMs)}; ` +
          `read ${formatBytes(vm.bytes.fromSource)} from QEMU ${vm.qemu.source} (dedup saved ${formatBytes(vm.bytes.dedupSaved)}); source ${vm.source}`,
      );
    } else {
      info(`${vm.name}: NOT evicted: ${vm.error}; the VM is ${vm.source} at the source`);
    }
  }
  const p = report.placement;
  info(`sent ${formatBytes(report.bytesToGather)} to the gather (${p.directPages} pages) and ${report.relays.map((r) => `${formatBytes(r.bytesSent)} to ${r.address} (${r.pages} pages${r.passedPages > 0 ? `; ${r.passedPages} passed on while relays lagged` : ""})`).join(", ") || "nothing to relays"}`);
}
