// How the VMs are evicted, shared by `scatter` and `evacuate`: switchover,
// passes, downtime, digest threads, dedup, and what becomes of the source.

import type { Command } from "cac";
import { defaultDigestThreads } from "../core/dedup/digest-pool.ts";
import { SgmError } from "../core/errors.ts";
import { DEFAULT_MAX_PASSES, DEFAULT_POSTCOPY_AFTER_PASS, DEFAULT_SWITCHOVER, type ScatterOptions } from "../core/scatter/engine.ts";
import { DEFAULT_DOWNTIME_LIMIT_MS } from "../core/scatter/source-qemu.ts";
import type { SwitchoverMode } from "../core/scatter/eviction-report.ts";
import { parseCount } from "./args.ts";

export interface EvictionFlags {
  keepSource?: boolean;
  dedup?: boolean;
  downtimeLimit?: unknown;
  switchover?: unknown;
  postcopyAfterPass?: unknown;
  maxPasses?: unknown;
  allowShortfall?: boolean;
  digestThreads?: unknown;
}

export type EvictionSettings = Pick<
  ScatterOptions,
  "keepSource" | "dedup" | "downtimeLimitMs" | "switchover" | "postcopyAfterPass" | "maxPasses" | "allowShortfall" | "digestThreads"
>;

export function addEvictionOptions(command: Command): Command {
  return command
    .option("--allow-shortfall", "Start even when the relays cannot hold what will not go direct: the rest waits for the gather")
    .option("--no-dedup", "Send content again wherever it recurs instead of naming what the gather or a relay holds: only to measure what dedup saves")
    .option("--keep-source", "Leave the source QEMU paused after eviction instead of quitting it")
    .option("--switchover <mode>", `precopy: the source converges into scatter; postcopy: it switches to postcopy and sends each remaining page once (default: ${DEFAULT_SWITCHOVER})`)
    .option("--postcopy-after-pass <n>", `With --switchover postcopy: precopy passes before the switch, 0 for at once (default: ${DEFAULT_POSTCOPY_AFTER_PASS})`)
    .option("--max-passes <n>", `With --switchover precopy: give up when the source has not converged after this many passes; the VM runs on at the source and scatter exits 75 (default: ${DEFAULT_MAX_PASSES})`)
    .option("--downtime-limit <ms>", `The source QEMU's downtime-limit for its final pass (default: ${DEFAULT_DOWNTIME_LIMIT_MS}; QEMU's own is 300)`)
    .option("--digest-threads <n>", `Threads that hash pages beside the one that reads the sources; 0 to hash on that one (default here: ${defaultDigestThreads()}, from the cores: up to 4, leaving 2)`);
}

export function parseEvictionFlags(flags: EvictionFlags): EvictionSettings {
  const switchover = flags.switchover === undefined ? undefined : parseSwitchover(String(flags.switchover));
  const postcopyAfterPass = flags.postcopyAfterPass === undefined ? undefined : parseCount("--postcopy-after-pass", flags.postcopyAfterPass, 0, 1000);
  if (postcopyAfterPass !== undefined && (switchover ?? DEFAULT_SWITCHOVER) !== "postcopy") {
    throw new SgmError("usage", "--postcopy-after-pass needs --switchover postcopy");
  }
  const maxPasses = flags.maxPasses === undefined ? undefined : parseCount("--max-passes", flags.maxPasses, 1, 10_000);
  if (maxPasses !== undefined && (switchover ?? DEFAULT_SWITCHOVER) !== "precopy") {
    throw new SgmError("usage", "--max-passes needs --switchover precopy (in postcopy the source switches after --postcopy-after-pass)");
  }
  return {
    switchover,
    postcopyAfterPass,
    maxPasses,
    digestThreads: flags.digestThreads === undefined ? defaultDigestThreads() : parseCount("--digest-threads", flags.digestThreads, 0, 64),
    downtimeLimitMs: flags.downtimeLimit === undefined ? undefined : parseCount("--downtime-limit", flags.downtimeLimit, 1, 60_000),
    keepSource: Boolean(flags.keepSource),
    allowShortfall: Boolean(flags.allowShortfall),
    dedup: flags.dedup !== false,
  };
}

function parseSwitchover(text: string): SwitchoverMode {
  if (text === "precopy" || text === "postcopy") return text;
  throw new SgmError("usage", `--switchover '${text}': expected precopy or postcopy`);
}
