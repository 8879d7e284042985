// The scatter role: evicts every VM it is given at once, sending pages to
// the gather while it takes them and to relays otherwise, with one dedup
// index across the VMs.

import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PAGE_BYTES } from "../dedup/digest.ts";
import type { DigestPool } from "../dedup/digest-pool.ts";
import { digestPoolFor } from "../dedup/hash-threads.ts";
import type { EvictionSlots } from "./eviction-slots.ts";
import type { RelayContents } from "./relay-contents.ts";
import type { ProgressSource } from "../progress.ts";
import { asSgmError, EXIT_CODES, SgmError } from "../errors.ts";
import { formatBytes, formatRate } from "../units.ts";
import { parseQmpAddress } from "../qmp/client.ts";
import { decodeControl, encodeControl } from "../wire/control.ts";
import { FrameType } from "../wire/messages.ts";
import { type PlacementStats, RunPlacement } from "./placement.ts";
import { planRelays, type RelayPlan } from "./relay-plan.ts";
import { releaseRoom, reserveRoom } from "./questions.ts";
import { SourceQemu } from "./source-qemu.ts";
import { checkRelayArgs, type PlanOptions, shortfallError, type Survey, survey, surveyOptions } from "./survey.ts";
import type { EvictionReport, SwitchoverMode } from "./eviction-report.ts";
import { VmEviction } from "./vm-eviction.ts";

/**
 * Postcopy after two passes, measured (test/benchmarks/switchover.bench.ts):
 * idle and moderately busy guests converge within two passes and switch over
 * as in precopy, same figures; a guest that dirties faster than any link
 * never converges in precopy (26 passes, 6.3 GiB sent for 256 MiB in 30 s)
 * and is evicted in 2.6 s this way.
 */
export const DEFAULT_SWITCHOVER: SwitchoverMode = "postcopy";
export const DEFAULT_POSTCOPY_AFTER_PASS = 2;
/**
 * With precopy switchover, passes the source may make before scatter gives
 * up: VMs that converge at all do so within a few (two, measured for an
 * idle and a moderately busy guest), and one that has not by 30 will not.
 */
export const DEFAULT_MAX_PASSES = 30;

export interface ScatterOptions extends PlanOptions {
  keepSource: boolean;
  downtimeLimitMs?: number;
  /** How the sources switch over (default: see DEFAULT_SWITCHOVER). */
  switchover?: SwitchoverMode;
  /** In postcopy mode: precopy passes before the switch (0: at once). */
  postcopyAfterPass?: number;
  /** In precopy mode: passes before scatter gives up on convergence (the VM runs on at the source). */
  maxPasses?: number;
  /** Pages of content kept pinned at the gather for dedup (default GATHER_PIN_PAGES). */
  gatherPinPages?: number;
  /** False to send every recurring content again (default true): the cost of no dedup, measured. */
  dedup?: boolean;
  /** Start even when the plan says the relays cannot hold what will not go direct: the rest waits for the gather. */
  allowShortfall?: boolean;
  /** Threads that hash pages beside the one that reads the sources (default 0: that one hashes). */
  digestThreads?: number;
  /** Given, once the evictions begin, what tells where each VM stands. */
  onProgress?: (source: ProgressSource) => void;
  /** Shared by the runs of an evacuation: each VM migrates once granted a slot (default: all at once). */
  slots?: EvictionSlots;
  /** Threads shared by the runs of an evacuation, instead of the run's own (digestThreads). */
  digestPool?: DigestPool | null;
  /** Called once the run is planned and its relays reserved, before any VM migrates. */
  onPlanned?: () => void;
  /** Shared by the runs of an evacuation: what the relays hold for any of them, so another need not send it again. */
  relayContents?: RelayContents;
}

export interface RelayReport {
  address: string;
  /** Pages it holds for this run, put or held by digest (replicas counted on each relay). */
  pages: number;
  refusedPages: number;
  /** New pages meant for relays that had it among their best --replicas by room: the share its room gives it. */
  rankedPages: number;
  /** Of those, pages placed elsewhere (another relay or the gather) because it, or another of their best, lagged. */
  passedPages: number;
  bytesSent: number;
  /** Why the relay was lost mid-run (its copies gone, the others' serving); null when it stayed. */
  lost: string | null;
}

export interface ScatterReport {
  ok: boolean;
  vms: EvictionReport[];
  /** Bytes on the wire, frames included: to the gather directly, and to each relay. */
  bytesToGather: number;
  relays: RelayReport[];
  placement: PlacementStats;
  /** The plan the run followed; null for a run without relays. */
  plan: RelayPlan | null;
  /** Milliseconds from the start to the first byte of migration: checks, connections, probes, plan. */
  planMs: number;
  /** The exit code the run maps to (0 when every VM was evicted). */
  exitCode: number;
}

/**
 * Does everything a run does before the first byte of migration and
 * returns its plan; the VMs are only queried. A shortfall is in the plan,
 * not thrown.
 */
export async function planScatter(options: PlanOptions): Promise<RelayPlan> {
  const sources = await openSources(options);
  try {
    const found = await survey(surveyOptions(options, true), sources, randomBytes(16).toString("hex"));
    found.gather.close();
    for (const r of found.relays) r.conn.close();
    return found.plan!;
  } finally {
    for (const s of sources) s.close();
  }
}

export async function runScatter(options: ScatterOptions): Promise<ScatterReport> {
  const log = options.log ?? (() => {});
  const plannedAt = performance.now();
  const sources = await openSources(options).catch((err: unknown) => {
    options.gatherConnection?.close();
    throw err;
  });
  const run = randomBytes(16);
  const runHex = run.toString("hex");
  let found: Survey | undefined;
  try {
    found = await survey(surveyOptions(options, false), sources, runHex);
    if (found.plan) {
      await settleReservations(found, runHex, options.signal, log);
      // the relays as they will be used: after the reservations, which may have left some out
      logPlan(found.plan, log);
      const short = shortfallError(found.plan);
      if (short && !(options.allowShortfall && found.plan.shortfall?.kind === "relay-memory")) throw short;
    }
  } catch (err) {
    // what was reserved goes back now, not at the TTL
    for (const r of found?.relays ?? []) {
      releaseRoom(r.conn, runHex);
      r.conn.close();
    }
    found?.gather.close();
    for (const s of sources) s.close();
    throw err;
  }
  // sizes first: from onPlanned on, the VMs queue for slots without a pause
  const sizes = options.slots ? await Promise.all(sources.map((s) => s.estimate().then((e) => e.ramBytes, () => 0))) : [];
  options.onPlanned?.();
  const conn = found.gather;
  const relays = found.relays;
  const opens = [conn, ...relays.map((r) => r.conn)];
  // the survey's probes are not the run's bytes
  const sentBefore = new Map(opens.map((c) => [c, c.bytesSent]));
  const startedAt = { mono: performance.now(), wall: Date.now() };

  const placement = new RunPlacement(conn, options.replicas ?? 1, { gatherPinPages: options.gatherPinPages, dedup: options.dedup, relayContents: options.relayContents, log });
  for (const r of relays) placement.addRelay(r.address, r.conn, run, r.free);
  conn.send(FrameType.CONTROL, encodeControl({ t: "relays", run: runHex, relays: relays.map((r) => r.address) }));

  const socketDir = mkdtempSync(join(tmpdir(), "sgm-scatter-"));
  const ownPool = options.digestPool === undefined;
  const digestPool = options.digestPool ?? digestPoolFor(options.digestThreads ?? 0);
  const evictions = sources.map(
    (source: SourceQemu, id) =>
      new VmEviction({
        id,
        name: source.name,
        source,
        conn,
        placement,
        digestPool,
        socketDir,
        startedAt,
        keepSource: options.keepSource,
        downtimeLimitMs: options.downtimeLimitMs,
        mode: options.switchover ?? DEFAULT_SWITCHOVER,
        postcopyAfterPass: options.postcopyAfterPass ?? DEFAULT_POSTCOPY_AFTER_PASS,
        maxPasses: options.maxPasses ?? DEFAULT_MAX_PASSES,
        log,
      }),
  );

  placement.neededWhile(() => evictions.some((e) => e.placing));
  options.onProgress?.(() => evictions.map((e) => e.snapshot()));

  conn.onFrame((type, payload) => {
    if (type !== FrameType.CONTROL) throw new SgmError("data", `gather sent frame type ${type}`);
    const message = decodeControl(payload);
    if (message.t === "received") {
      placement.gatherReceived(message.bytes);
      return;
    }
    if (message.t === "relay-lost") {
      placement.relayGone(message.address, message.reason);
      return;
    }
    if (!("vm" in message)) throw new SgmError("data", `gather sent '${message.t}'`);
    const eviction = evictions[message.vm];
    if (!eviction) throw new SgmError("data", `gather named unknown VM id ${message.vm}`);
    eviction.onControl(message);
  });
  void conn.closed.then((reason) => {
    for (const e of evictions) e.onDisconnect(reason);
  });
  const onAbort = () => {
    const reason = asSgmError(options.signal?.reason ?? new SgmError("interrupted", "interrupted"));
    for (const e of evictions) e.fail(reason);
  };
  options.signal?.addEventListener("abort", onAbort);
  if (options.signal?.aborted) onAbort();

  try {
    const reports = await Promise.all(evictions.map((e, i) => runInSlot(e, sizes[i] ?? 0, options.slots, options.signal)));
    return {
      ok: reports.every((r) => r.ok),
      vms: reports,
      bytesToGather: conn.bytesSent - sentBefore.get(conn)!,
      relays: placement.relays.map((r) => ({
        address: r.address,
        pages: r.pagesPut - r.pagesRefused + r.pagesHeld,
        refusedPages: r.pagesRefused,
        rankedPages: r.pagesRanked,
        passedPages: r.pagesPassed,
        bytesSent: r.conn.bytesSent - (sentBefore.get(r.conn) ?? 0),
        lost: r.lostReason,
      })),
      placement: { ...placement.stats },
      plan: found.plan,
      planMs: Math.round(startedAt.mono - plannedAt),
      exitCode: exitCodeOf(reports),
    };
  } finally {
    options.signal?.removeEventListener("abort", onAbort);
    // what the run reserved and did not fill goes back to other runs; the pages it placed stay held
    for (const r of relays) releaseRoom(r.conn, runHex);
    await conn.whenWritable(0).catch(() => {});
    for (const c of opens) c.close();
    for (const s of sources) s.close();
    if (ownPool) digestPool?.close();
    rmSync(socketDir, { recursive: true, force: true });
  }
}

/**
 * Runs the eviction once it has a slot. One stopped, or failed (its gather
 * or a relay lost), while it waited never starts, and takes no slot.
 */
async function runInSlot(eviction: VmEviction, bytes: number, slots: EvictionSlots | undefined, signal: AbortSignal | undefined): Promise<EvictionReport> {
  if (!slots) return eviction.run();
  const failed = new AbortController();
  void eviction.failing.then((reason) => failed.abort(reason));
  let release: () => void;
  try {
    release = await slots.acquire(bytes, signal ? AbortSignal.any([signal, failed.signal]) : failed.signal);
  } catch (err) {
    return eviction.skip(asSgmError(err));
  }
  try {
    // it may have failed as the slot came, before the abort could take it off the queue
    const failure = eviction.failure;
    return failure ? eviction.skip(failure) : await eviction.run();
  } finally {
    release();
  }
}

/**
 * 0 when every VM was evicted; 3 (partial) when some were and every other
 * one runs on at the source, so a script can retry just those; otherwise
 * the worst failure's code.
 */
export function exitCodeOf(reports: ReadonlyArray<Pick<EvictionReport, "ok" | "exitCode" | "source">>): number {
  const failures = reports.filter((r) => !r.ok);
  if (failures.length === 0) return 0;
  // a script must know it was stopped, even when the rest was evicted
  if (failures.some((r) => r.exitCode === EXIT_CODES.interrupted)) return EXIT_CODES.interrupted;
  if (failures.length < reports.length && failures.every((r) => r.source === "running")) return EXIT_CODES.partial;
  return Math.max(...failures.map((r) => r.exitCode ?? EXIT_CODES.internal));
}

/**
 * Reserves on each chosen relay what the plan expects there. A relay that
 * grants less had that room reserved by another run since it was asked,
 * and one that went away since grants nothing: the plan is made again with
 * what was granted (a relay that granted nothing is left out), so its
 * shortfall, and the placement's weights, are what this run really has.
 */
async function settleReservations(found: Survey, run: string, signal: AbortSignal | undefined, log: (line: string) => void): Promise<void> {
  const plan = found.plan!;
  const granted: number[] = [];
  const lost = new Map<string, string>();
  for (const [i, r] of found.relays.entries()) {
    const bytes = await reserveRoom(r.conn, r.address, run, plan.chosen[i]!.expectedBytes, signal).catch((err: unknown) => {
      signal?.throwIfAborted();
      lost.set(r.address, `it went away: ${asSgmError(err).message}`);
      return 0;
    });
    granted.push(bytes);
  }
  signal?.throwIfAborted();
  if (plan.chosen.every((c, i) => granted[i]! >= c.expectedBytes)) return;
  const input = found.input!;
  const shrunk = plan.chosen.map((c, i) => ({ ...c, free: granted[i]! < c.expectedBytes ? granted[i]! : c.free }));
  const kept = shrunk.filter((c) => c.free >= PAGE_BYTES);
  const gone = shrunk.filter((c) => c.free < PAGE_BYTES);
  const why = (address: string) => lost.get(address) ?? "another run reserved its room";
  for (const c of gone) {
    log(`relay ${c.address} left out: ${why(c.address)}`);
    const relay = found.relays.find((r) => r.address === c.address)!;
    releaseRoom(relay.conn, run);
    relay.conn.close();
  }
  // one that went away counts as unreachable, as at the survey: left out when enough others remain
  const left = (c: (typeof gone)[number]) => ({ address: c.address, reason: why(c.address) });
  found.plan = planRelays({
    ...input,
    candidates: kept,
    full: [...input.full, ...gone.filter((c) => !lost.has(c.address)).map(left)],
    unreachable: [...input.unreachable, ...gone.filter((c) => lost.has(c.address)).map(left)],
    useAll: true,
  });
  found.relays = kept.map((c) => ({ ...found.relays.find((r) => r.address === c.address)!, free: c.free }));
}

async function openSources(options: PlanOptions): Promise<SourceQemu[]> {
  checkRelayArgs(options);
  options.signal?.throwIfAborted();
  // Every source is checked before anything moves.
  const opened = await Promise.allSettled(options.vms.map((vm) => SourceQemu.open(vm.name, parseQmpAddress(vm.qmp))));
  const sources = opened.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
  const refused = opened.find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (refused) {
    for (const s of sources) s.close();
    throw asSgmError(refused.reason);
  }
  return sources;
}

function logPlan(plan: RelayPlan, log: (line: string) => void): void {
  for (const r of plan.leftOut) if (r.reason.startsWith("not needed")) log(`relay ${r.address} left out: ${r.reason}`);
  if (plan.chosen.length > 0) {
    log(`relays: ${plan.chosen.map((r) => `${r.address} (${formatBytes(r.free)} free, ${formatRate(r.rate)})`).join(", ")}; ${plan.replicas} per page, shared by room`);
  }
}
