// `sgm evacuate`: empties this host of VMs bound for several destinations.
// One scatter run per destination gather, all sharing the relays named, the
// digest threads and the slots that keep at most --max-in-flight VMs
// migrating, largest first. A VM that cannot go (its QEMU does not answer,
// its gather is not there, its eviction fails) stays at the source, and
// the others go on.
//
// Dedup spans every VM bound for the same destination, whenever each
// starts: a run's gather connection and relay holds last until its last VM
// is done. Across destinations it goes through the relays: what any run
// puts on a relay, the relay keeps for the evacuation while it has room no
// run needs, and another run has the relay hold it for its own gather too,
// by digest (relay-contents.ts), so each gather fetches it there and
// releases only its own run's hold. Content that went straight to one
// gather is sent again to another: no gather can fetch from another.

import { asSgmError, SgmError } from "../errors.ts";
import { formatHostPort, type HostPort } from "../net/host-port.ts";
import type { ProgressSource, VmProgress } from "../progress.ts";
import { parseQmpAddress } from "../qmp/client.ts";
import type { PeerConnection, TlsFiles } from "../wire/connection.ts";
import { digestPoolFor } from "../dedup/hash-threads.ts";
import { exitCodeOf, runScatter, type ScatterOptions, type ScatterReport } from "./engine.ts";
import { EvictionSlots } from "./eviction-slots.ts";
import { RelayContents } from "./relay-contents.ts";
import { SourceQemu } from "./source-qemu.ts";
import { dropKept } from "./questions.ts";
import { connectGather, connectPeer, surveyOptions } from "./survey.ts";
import type { EvictionReport } from "./eviction-report.ts";

export interface EvacuationTarget {
  name: string;
  qmp: string;
  /** The gather on the VM's destination host. */
  gather: HostPort;
}

export interface EvacuationOptions extends Omit<ScatterOptions, "gather" | "vms" | "slots" | "digestPool" | "onPlanned" | "gatherConnection" | "relayContents"> {
  targets: EvacuationTarget[];
  /** VMs migrating at once, across destinations (default: all). */
  maxInFlight?: number;
}

export interface EvacuatedVm {
  name: string;
  /** The gather it was bound for. */
  to: string;
  ramBytes: number | null;
  ok: boolean;
  error?: string;
  /** Where the VM is now at the source: quit, paused, running, or unknown (its QEMU did not answer). */
  source: string;
  exitCode?: number;
  /** From the evacuation's start until it began to migrate (it may have waited for a slot). */
  startedAfterMs: number | null;
  /** From the evacuation's start until every byte of its final state was held off this host. */
  evictedAfterMs: number | null;
  /** Its run's report of it; null when no run took it (its QEMU or its gather could not be reached). */
  eviction: EvictionReport | null;
}

export interface DestinationRun {
  to: string;
  vms: string[];
  /** Why the run did not start; null when it did. */
  error: string | null;
  /** The run's own report, its VMs left out (they are in the evacuation's list). */
  run: Omit<ScatterReport, "vms"> | null;
}

export interface EvacuationReport {
  ok: boolean;
  /** Every VM named, largest first: the order they were given slots in. */
  vms: EvacuatedVm[];
  destinations: DestinationRun[];
  host: {
    vms: number;
    evicted: number;
    failed: number;
    /** From the start until the last VM was evicted, when every one was: the host is empty. */
    emptiedAfterMs: number | null;
    bytesFromSources: number;
    dedupSavedBytes: number;
  };
  /** 0 when every VM was evicted; 3 when some were and the rest run on at the source; else the worst failure's. */
  exitCode: number;
}

/** What a VM's QEMU said before anything moved: its size and state, or why it did not answer. */
type Sized = { name: string; qmp: string; to: string; gather: HostPort } & (
  | { ramBytes: number; runState: string; error: null }
  | { ramBytes: null; runState: null; error: SgmError }
);

interface Group {
  to: string;
  gather: HostPort;
  vms: Array<Sized & { error: null }>;
  progress: ProgressSource | null;
  startedAfterMs: number;
  result: PromiseSettledResult<ScatterReport> | null;
}

export async function runEvacuation(options: EvacuationOptions): Promise<EvacuationReport> {
  const log = options.log ?? (() => {});
  const startedAt = performance.now();
  const { targets, maxInFlight, onProgress, ...common } = options;
  checkTargets(targets);
  const vms = await Promise.all(targets.map((t) => sizeUp(t)));
  // largest first; Array.prototype.sort is stable, so ties keep the order given
  const order = [...vms].sort((a, b) => (b.ramBytes ?? 0) - (a.ramBytes ?? 0));
  const groups = new Map<string, Group>();
  for (const vm of order) {
    if (vm.error) continue;
    const group = groups.get(vm.to) ?? { to: vm.to, gather: vm.gather, vms: [], progress: null, startedAfterMs: 0, result: null };
    group.vms.push(vm);
    groups.set(vm.to, group);
  }
  onProgress?.(() => order.map((vm) => progressOf(vm, groups.get(vm.to))));

  const slots = new EvictionSlots(Math.max(1, maxInFlight ?? targets.length));
  const relayContents = new RelayContents();
  const digestPool = digestPoolFor(common.digestThreads ?? 0);
  // every gather at once: one that is not there yet holds up none of the others
  const answers = new Map<Group, { conn: Promise<PeerConnection>; answered: boolean }>();
  for (const g of groups.values()) {
    const answer = { conn: connectGather(surveyOptions({ ...common, gather: g.gather, vms: [] }, false)), answered: false };
    answer.conn.then(
      () => (answer.answered = true),
      () => (answer.answered = true),
    );
    answers.set(g, answer);
  }
  const fail = (group: Group, err: unknown) => {
    group.result = { status: "rejected", reason: err };
    log(`${group.vms.map((v) => v.name).join(", ")} stay here: ${asSgmError(err).message}`);
  };
  /**
   * Starts the group's run on its gather's connection; resolves once it has
   * planned (or failed), with its end (wrapped: an async function's result
   * would be the end itself).
   */
  const startRun = async (group: Group, conn: PeerConnection): Promise<{ ended: Promise<void> } | null> => {
    if (common.signal?.aborted) {
      // runs already started end on their own (the signal reaches them); this one never starts
      conn.close();
      fail(group, new SgmError("interrupted", "interrupted before its run began"));
      return null;
    }
    group.startedAfterMs = performance.now() - startedAt;
    const planned = Promise.withResolvers<void>();
    log(`${group.to}: planning the run of ${group.vms.map((v) => v.name).join(", ")}`);
    const run = runScatter({
      ...common,
      gather: group.gather,
      gatherConnection: conn,
      vms: group.vms.map((v) => ({ name: v.name, qmp: v.qmp })),
      slots,
      digestPool,
      relayContents,
      onPlanned: () => planned.resolve(),
      onProgress: (source) => (group.progress = source),
    });
    const settled = run.then(
      (report) => void (group.result = { status: "fulfilled", value: report }),
      (err: unknown) => fail(group, err),
    );
    // one run at a time to its plan: their rate probes would otherwise share the links they measure
    await Promise.race([planned.promise, settled]);
    return { ended: settled };
  };
  const runs: Array<Promise<void>> = [];
  try {
    const waiting = new Set(groups.values());
    while (waiting.size > 0) {
      // of the gathers that have answered, the one with the largest VM: Map order
      const group = await Promise.race([...waiting].map((g) => answers.get(g)!.conn.then(() => g, () => g)));
      waiting.delete(group);
      const conn = await answers.get(group)!.conn.catch((err: unknown) => {
        fail(group, err);
        return null;
      });
      const run = conn && (await startRun(group, conn));
      if (run) runs.push(run.ended);
      // slots go largest first once every run ready to plan has: a gather still
      // not listening (waited for up to --wait-gather) holds up none of them
      if ([...waiting].every((g) => !answers.get(g)!.answered)) slots.open();
    }
    slots.open();
    await Promise.all(runs);
  } finally {
    digestPool?.close();
    await dropKeptContent(relayContents, common.relays ?? [], common.psk, common.tls ?? null, log);
  }
  return report(order, [...groups.values()]);
}

/** The evacuation is over: what the relays kept for it goes (a relay not reached drops it after its TTL). */
async function dropKeptContent(contents: RelayContents, relays: readonly HostPort[], psk: Uint8Array, tls: TlsFiles | null, log: (line: string) => void): Promise<void> {
  const keeper = Buffer.from(contents.keeper).toString("hex");
  const used = relays.filter((r) => contents.relayAddresses.includes(formatHostPort(r.host, r.port)));
  await Promise.all(
    used.map(async (r) => {
      const address = formatHostPort(r.host, r.port);
      let conn: PeerConnection | undefined;
      try {
        conn = await connectPeer(r, psk, "relay", tls);
        const pages = await dropKept(conn, address, keeper);
        log(`relay ${address}: dropped the ${pages} pages it kept for this evacuation`);
      } catch (err) {
        log(`relay ${address} keeps this evacuation's pages until its TTL: ${asSgmError(err).message}`);
      } finally {
        conn?.close();
      }
    }),
  );
}

function checkTargets(targets: readonly EvacuationTarget[]): void {
  if (targets.length === 0) throw new SgmError("usage", "no VMs to evacuate");
  const names = new Set<string>();
  for (const t of targets) {
    if (names.has(t.name)) throw new SgmError("usage", `VM '${t.name}' is named twice`);
    names.add(t.name);
  }
}

/** Asks the VM's QEMU what it is and how large, and lets go: its run opens it again. */
async function sizeUp(target: EvacuationTarget): Promise<Sized> {
  const vm = { name: target.name, qmp: target.qmp, to: formatHostPort(target.gather.host, target.gather.port), gather: target.gather };
  let source: SourceQemu | undefined;
  try {
    source = await SourceQemu.open(target.name, parseQmpAddress(target.qmp));
    const { ramBytes } = await source.estimate();
    return { ...vm, ramBytes, runState: source.info.runState, error: null };
  } catch (err) {
    return { ...vm, ramBytes: null, runState: null, error: asSgmError(err) };
  } finally {
    source?.close();
  }
}

function progressOf(vm: Sized, group: Group | undefined): VmProgress {
  const fromRun = group?.progress?.().find((p) => p.name === vm.name);
  if (fromRun) return fromRun;
  const failed = vm.error !== null || group?.result?.status === "rejected";
  return { name: vm.name, phase: failed ? "failed" : "checking", pass: 0, bytes: 0, totalBytes: vm.ramBytes };
}

function notEvicted(vm: Sized, error: SgmError, source: string): EvacuatedVm {
  const message = error.message.includes(vm.to) ? error.message : `${vm.to}: ${error.message}`;
  return { name: vm.name, to: vm.to, ramBytes: vm.ramBytes, ok: false, error: message, source, exitCode: error.exitCode, startedAfterMs: null, evictedAfterMs: null, eviction: null };
}

function report(order: Sized[], groups: Group[]): EvacuationReport {
  const outcomes = new Map<string, EvacuatedVm>();
  for (const vm of order) if (vm.error) outcomes.set(vm.name, notEvicted(vm, vm.error, "unknown"));
  const destinations: DestinationRun[] = [];
  for (const group of groups) {
    const names = group.vms.map((v) => v.name);
    const result = group.result;
    if (!result || result.status === "rejected") {
      const e = asSgmError(result?.status === "rejected" ? result.reason : new SgmError("internal", "the run never ended"));
      // nothing was asked of these VMs' sources: they are as they were
      for (const vm of group.vms) outcomes.set(vm.name, notEvicted(vm, e, vm.runState));
      destinations.push({ to: group.to, vms: names, error: e.message, run: null });
      continue;
    }
    const { vms: evictions, ...run } = result.value;
    const after = (ms: number | null) => (ms === null ? null : Math.round(group.startedAfterMs + run.planMs + ms));
    for (const vm of group.vms) {
      const eviction = evictions.find((e) => e.name === vm.name)!;
      outcomes.set(vm.name, {
        name: vm.name,
        to: vm.to,
        ramBytes: vm.ramBytes,
        ok: eviction.ok,
        ...(eviction.ok ? {} : { error: eviction.error, exitCode: eviction.exitCode }),
        source: eviction.source,
        startedAfterMs: after(eviction.queuedMs),
        evictedAfterMs: after(eviction.evictionMs),
        eviction,
      });
    }
    destinations.push({ to: group.to, vms: names, error: null, run });
  }
  const vms = order.map((vm) => outcomes.get(vm.name)!);
  const evicted = vms.filter((v) => v.ok);
  const exitCode = exitCodeOf(vms);
  return {
    ok: exitCode === 0,
    vms,
    destinations,
    host: {
      vms: vms.length,
      evicted: evicted.length,
      failed: vms.length - evicted.length,
      emptiedAfterMs: evicted.length === vms.length ? Math.max(...vms.map((v) => v.evictedAfterMs ?? 0)) : null,
      bytesFromSources: vms.reduce((n, v) => n + (v.eviction?.bytes.fromSource ?? 0), 0),
      dedupSavedBytes: vms.reduce((n, v) => n + (v.eviction?.bytes.dedupSaved ?? 0), 0),
    },
    exitCode,
  };
}
