// sgm scatter: runs on the host being emptied.

import type { CAC } from "cac";
import { defaultDigestThreads } from "../core/dedup/digest-pool.ts";
import { SgmError } from "../core/errors.ts";
import { DEFAULT_MAX_PASSES, DEFAULT_POSTCOPY_AFTER_PASS, DEFAULT_SWITCHOVER, planScatter, runScatter, type ScatterReport } from "../core/scatter/engine.ts";
import { shortfallError } from "../core/scatter/survey.ts";
import type { SwitchoverMode } from "../core/scatter/vm-eviction.ts";
import { DEFAULT_DOWNTIME_LIMIT_MS } from "../core/scatter/source-qemu.ts";
import { parseCount } from "./args.ts";
import { renderPlan } from "./plan-output.ts";
import { addRunOptions, parseRunFlags, readKey, type RunFlags } from "./run-flags.ts";
import { formatBytes } from "../core/units.ts";
import { formatMs, info, printJson, setQuiet } from "./output.ts";
import { progressDisplay } from "./progress.ts";

interface ScatterFlags extends RunFlags {
  keepSource?: boolean;
  dedup?: boolean;
  downtimeLimit?: unknown;
  switchover?: unknown;
  postcopyAfterPass?: unknown;
  maxPasses?: unknown;
  allowShortfall?: boolean;
  digestThreads?: unknown;
  plan?: boolean;
  json?: boolean;
  quiet?: boolean;
}

export function registerScatter(cli: CAC, signal: AbortSignal): void {
  addRunOptions(
    cli
      .command("scatter", "Evict VMs from this host: read their migration streams and scatter the pages to the gather and relays")
      .usage("scatter --to HOST:PORT --vm NAME=QMP_SOCKET [--vm ...] --psk-file FILE [options]"),
  )
    .option("--allow-shortfall", "Start even when the relays cannot hold what will not go direct: the rest waits for the gather")
    .option("--plan", "Check the VMs, measure the gather and relays, print which relays the run would use and why, and exit: 0 if it would start, 78 if the relays are short of memory, 69 if too few are reachable. Moves nothing")
    .option("--no-dedup", "Send content again wherever it recurs instead of naming what the gather or a relay holds: only to measure what dedup saves")
    .option("--keep-source", "Leave the source QEMU paused after eviction instead of quitting it")
    .option("--switchover <mode>", `precopy: the source converges into scatter; postcopy: it switches to postcopy and sends each remaining page once (default: ${DEFAULT_SWITCHOVER})`)
    .option("--postcopy-after-pass <n>", `With --switchover postcopy: precopy passes before the switch, 0 for at once (default: ${DEFAULT_POSTCOPY_AFTER_PASS})`)
    .option("--max-passes <n>", `With --switchover precopy: give up when the source has not converged after this many passes; the VM runs on at the source and scatter exits 75 (default: ${DEFAULT_MAX_PASSES})`)
    .option("--downtime-limit <ms>", `The source QEMU's downtime-limit for its final pass (default: ${DEFAULT_DOWNTIME_LIMIT_MS}; QEMU's own is 300)`)
    .option("--digest-threads <n>", `Threads that hash pages beside the one that reads the sources; 0 to hash on that one (default here: ${defaultDigestThreads()}, from the cores: up to 4, leaving 2)`)
    .option("--json", "Print the final report as JSON on stdout")
    .option("--quiet", "Print no progress and no report lines on stderr; warnings and errors still")
    .example("sgm scatter --to dst:7700 --vm web1=/run/qemu/web1.qmp --via r1:7701,r2:7701 --psk-file /etc/sgm/psk")
    .action(async (flags: ScatterFlags) => {
      const run = parseRunFlags(flags);
      const switchover = flags.switchover === undefined ? undefined : parseSwitchover(String(flags.switchover));
      const postcopyAfterPass = flags.postcopyAfterPass === undefined ? undefined : parseCount("--postcopy-after-pass", flags.postcopyAfterPass, 0, 1000);
      if (postcopyAfterPass !== undefined && (switchover ?? DEFAULT_SWITCHOVER) !== "postcopy") {
        throw new SgmError("usage", "--postcopy-after-pass needs --switchover postcopy");
      }
      const maxPasses = flags.maxPasses === undefined ? undefined : parseCount("--max-passes", flags.maxPasses, 1, 10_000);
      if (maxPasses !== undefined && (switchover ?? DEFAULT_SWITCHOVER) !== "precopy") {
        throw new SgmError("usage", "--max-passes needs --switchover precopy (in postcopy the source switches after --postcopy-after-pass)");
      }
      const digestThreads = flags.digestThreads === undefined ? defaultDigestThreads() : parseCount("--digest-threads", flags.digestThreads, 0, 64);
      const downtimeLimitMs = flags.downtimeLimit === undefined ? undefined : parseCount("--downtime-limit", flags.downtimeLimit, 1, 60_000);
      setQuiet(Boolean(flags.quiet));
      const common = { ...run, psk: readKey(flags), signal, log: info };
      if (flags.plan) {
        const plan = await planScatter(common);
        renderPlan(plan);
        if (flags.json) printJson(plan);
        return shortfallError(plan)?.exitCode ?? 0;
      }
      const display = progressDisplay({ verb: "scattered", quiet: Boolean(flags.quiet), live: Boolean(process.stderr.isTTY) });
      let report: ScatterReport;
      try {
        report = await runScatter({
          ...common,
          onProgress: (source) => display.start(source),
          switchover,
          postcopyAfterPass,
          maxPasses,
          keepSource: Boolean(flags.keepSource),
          allowShortfall: Boolean(flags.allowShortfall),
          dedup: flags.dedup !== false,
          downtimeLimitMs,
          digestThreads,
        });
      } finally {
        display.stop();
      }
      render(report);
      if (flags.json) printJson(report);
      return report.exitCode;
    });
}

function parseSwitchover(text: string): SwitchoverMode {
  if (text === "precopy" || text === "postcopy") return text;
  throw new SgmError("usage", `--switchover '${text}': expected precopy or postcopy`);
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
  info(`sent ${formatBytes(report.bytesToGather)} to the gather (${p.directPages} pages) and ${report.relays.map((r) => `${formatBytes(r.bytesSent)} to ${r.address} (${r.pages} pages)`).join(", ") || "nothing to relays"}`);
}
