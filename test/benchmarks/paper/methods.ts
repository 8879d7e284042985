// The ways the benchmark empties the source host, each run on the same bed
// with every process in its host: QEMU's own pre-copy and post-copy straight
// to the destination, and sgm with 0 to 3 relays, with dedup or without.

import { readFileSync } from "node:fs";
import { RUNTIME_SETTINGS } from "../../../cli/runtime-settings.ts";
import type { GatherReport } from "../../../core/gather/engine.ts";
import type { ScatterReport } from "../../../core/scatter/engine.ts";
import type { Bed } from "../../harness/bed.ts";
import { migrateDirect } from "../../harness/direct.ts";
import { report } from "../../harness/cluster.ts";
import { startSgm } from "../../harness/sgm.ts";
import type { VmAt } from "./guests.ts";

export type Method =
  | { id: string; label: string; kind: "precopy" | "postcopy" }
  | { id: string; label: string; kind: "sgm"; relays: number; dedup: boolean };

export const METHODS: readonly Method[] = [
  { id: "precopy", label: "QEMU pre-copy", kind: "precopy" },
  { id: "postcopy", label: "QEMU post-copy", kind: "postcopy" },
  { id: "sgm-0", label: "sgm, no relay", kind: "sgm", relays: 0, dedup: true },
  { id: "sgm-1", label: "sgm, 1 relay", kind: "sgm", relays: 1, dedup: true },
  { id: "sgm-2", label: "sgm, 2 relays", kind: "sgm", relays: 2, dedup: true },
  { id: "sgm-3", label: "sgm, 3 relays", kind: "sgm", relays: 3, dedup: true },
  { id: "sgm-3-nodedup", label: "sgm, 3 relays, no dedup", kind: "sgm", relays: 3, dedup: false },
];

/** CPU seconds each kind of process spent in a run: where a 2-core machine's time went. */
export interface CpuSeconds {
  sourceQemu: number;
  destinationQemu: number;
  scatter: number;
  relays: number;
  gather: number;
}

/** One eviction of every VM, as the host sees it: the slowest VM decides. */
export interface Timing {
  /** The source host is free of every VM's state. */
  evictionMs: number;
  /** Every destination holds every page. */
  totalMs: number;
  /** The longest time any VM ran nowhere. */
  downtimeMs: number;
}

export interface RunContext {
  bed: Bed;
  vms: VmAt[];
  psk: string;
  /** QEMU's own migration still going after this is given up (pre-copy of a busy guest may never converge). */
  qemuLimitMs: number;
  /** sgm still going after this has failed. */
  sgmLimitMs: number;
  /** The source's link rate, bytes a second: scatter is told it, as an operator knows the host's link. */
  sourceRate: number;
  /** Told of every process of the run, and of the moment the host is evicted. */
  cpu: CpuMeter;
  /** Filled in as the run goes: what scatter logged. */
  log: string[];
}

export function runMethod(method: Method, ctx: RunContext): Promise<Timing> {
  return method.kind === "sgm" ? runSgm(ctx, method.relays, method.dedup) : runQemu(ctx, method.kind === "postcopy");
}

/** CPU seconds (user and system) a live process has spent so far, from /proc. */
export function processCpuSeconds(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // utime and stime, fields 14 and 15 of stat(5), in clock ticks of 1/100 s
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return 0;
  }
}

const NO_CPU: CpuSeconds = { sourceQemu: 0, destinationQemu: 0, scatter: 0, relays: 0, gather: 0 };

/** The CPU each kind of process spends from when it is tracked: until the host is evicted, and in all. */
export class CpuMeter {
  private readonly tracked: Array<{ role: keyof CpuSeconds; pid: number; base: number; last: number }> = [];
  private readonly reported: Partial<CpuSeconds> = {};
  atEviction: CpuSeconds | null = null;

  track(role: keyof CpuSeconds, pid: number): void {
    const now = processCpuSeconds(pid);
    this.tracked.push({ role, pid, base: now, last: now });
  }

  /** A process's own account of its whole life, taken over from now on. */
  report(role: keyof CpuSeconds, seconds: number): void {
    this.reported[role] = seconds;
  }

  evicted(): void {
    this.atEviction = this.read();
  }

  /** So far; a process gone keeps what it was last read at. */
  read(): CpuSeconds {
    const out = { ...NO_CPU };
    for (const t of this.tracked) {
      t.last = Math.max(t.last, processCpuSeconds(t.pid));
      out[t.role] += t.last - t.base;
    }
    return { ...out, ...this.reported };
  }
}

interface ProcessResources {
  cpuUserSeconds: number;
  cpuSystemSeconds: number;
}

async function runQemu(ctx: RunContext, postcopy: boolean): Promise<Timing> {
  const address = ctx.bed.hosts.get("dst")!.address;
  let evictedVms = 0;
  const per = await Promise.all(
    ctx.vms.map(({ source, destination }, v) =>
      migrateDirect(source, destination, "", {
        uri: `tcp:${address}:${4400 + v}`,
        postcopy,
        // QEMU's default cap (128 MiB/s) would hide the links; the bed's rates hold it
        maxBandwidth: 64 * 2 ** 30,
        timeoutMs: ctx.qemuLimitMs,
        onSourceCompleted: () => {
          if (++evictedVms === ctx.vms.length) ctx.cpu.evicted();
        },
      }),
    ),
  );
  return worst(per);
}

// sgm runs itself again with these set (cli/runtime-settings.ts); set here,
// the process we start is the one that works, and its CPU can be read
const ONE_PROCESS = RUNTIME_SETTINGS;

async function runSgm(ctx: RunContext, relayCount: number, dedup: boolean): Promise<Timing> {
  const { bed, vms, psk } = ctx;
  const relays = await Promise.all(
    Array.from({ length: relayCount }, async (_, r) => {
      const host = `relay${r + 1}`;
      const listen = `${bed.hosts.get(host)!.address}:7700`;
      const relay = await startSgm(["relay", "--listen", listen, "--capacity", "4GiB", "--psk-file", psk], ONE_PROCESS, bed.exec(host, []));
      await relay.waitStderr(/relay listening on/);
      ctx.cpu.track("relays", relay.proc.pid);
      return { relay, listen };
    }),
  );
  const to = `${bed.hosts.get("dst")!.address}:7800`;
  const names = vms.map((_, v) => `vm${v}`);
  const gather = await startSgm(
    ["gather", "--listen", to, ...vms.flatMap((vm, v) => ["--vm", `${names[v]}=${vm.destination.qmpPath}`]), "--psk-file", psk, "--json"],
    ONE_PROCESS,
    bed.exec("dst", []),
  );
  await gather.waitStderr(/listening on/);
  ctx.cpu.track("gather", gather.proc.pid);
  const via = relays.length > 0 ? ["--all-relays", "--source-rate", String(Math.round(ctx.sourceRate)), "--via", relays.map((r) => r.listen).join(",")] : [];
  const scatter = await startSgm(
    // --keep-source: the source QEMU stays, paused, as QEMU's own migrations leave it, so its CPU can be read
    ["scatter", "--to", to, ...vms.flatMap((vm, v) => ["--vm", `${names[v]}=${vm.source.qmpPath}`]), ...via, "--psk-file", psk, "--json", "--keep-source", ...(dedup ? [] : ["--no-dedup"])],
    ONE_PROCESS,
    bed.exec("src", []),
  );
  const limit = setTimeout(() => {
    scatter.proc.kill("SIGTERM");
    gather.proc.kill("SIGTERM");
  }, ctx.sgmLimitMs);
  try {
    // scatter exits once every VM is evicted and runs at the destination
    const s = await scatter.result();
    if (s.code !== 0) gather.proc.kill("SIGTERM");
    const cpuOf = (r: { process?: ProcessResources }) => (r.process ? r.process.cpuUserSeconds + r.process.cpuSystemSeconds : 0);
    const sr = report<ScatterReport & { process: ProcessResources }>(s);
    ctx.cpu.report("scatter", cpuOf(sr));
    ctx.cpu.evicted();
    ctx.log.push(...s.stderr.trim().split("\n"));
    const g = await gather.result();
    if (s.code !== 0 || g.code !== 0) {
      throw new Error(`sgm failed: scatter exit ${s.code}, gather exit ${g.code}: ${lastLine(s.stderr)} / ${lastLine(g.stderr)}`);
    }
    const gr = report<GatherReport & { process: ProcessResources }>(g);
    ctx.cpu.report("gather", cpuOf(gr));
    // sgm's times start at its first byte of migration; its checks, probes and plan come before, as QEMU's setup does in its own
    return worst(
      sr.vms.map((vm) => ({
        evictionMs: sr.planMs + vm.evictionMs!,
        downtimeMs: vm.downtimeMs ?? NaN,
        totalMs: sr.planMs + gr.vms.find((a) => a.name === vm.name)!.totalMs!,
      })),
    );
  } finally {
    clearTimeout(limit);
    ctx.cpu.read();
    for (const r of relays) r.relay.proc.kill("SIGINT");
  }
}

function worst(per: Timing[]): Timing {
  return {
    evictionMs: Math.max(...per.map((t) => t.evictionMs)),
    totalMs: Math.max(...per.map((t) => t.totalMs)),
    downtimeMs: Math.max(...per.map((t) => t.downtimeMs)),
  };
}

function lastLine(text: string): string {
  return text.trim().split("\n").at(-1) ?? "";
}
