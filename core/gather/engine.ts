// The gather role: receives every VM bound for this host from the scatter,
// takes pages sent to it directly and fetches the rest from relays, checks
// every page against its digest, and feeds each destination QEMU. It exits
// when every VM it serves completed or failed.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { digestPoolFor } from "../dedup/hash-threads.ts";
import { asSgmError, SgmError } from "../errors.ts";
import type { ProgressSource } from "../progress.ts";
import { collectGarbageEvery } from "../net/garbage.ts";
import { RateLimiter } from "../net/rate-limiter.ts";
import { parseQmpAddress } from "../qmp/client.ts";
import type { TlsFiles } from "../wire/connection.ts";
import { listenPeers, type PeerListener } from "../wire/peer-listener.ts";
import { maxPayload } from "../wire/messages.ts";
import { holderSocketPath, prepareStateDir, resumeStatePath } from "./resume-state.ts";
import { openForResume, resumeAll, unresumableReport } from "./resume.ts";
import { DestinationQemu } from "./destination-qemu.ts";
import type { HolderPlan } from "../qmp/holder-launch.ts";
import type { FetcherStats, RelayFetcher } from "./relay-fetcher.ts";
import type { ArrivalReport } from "./arrival-report.ts";
import { VmArrival } from "./vm-arrival.ts";
import { type GatherShared, HANG_UP_WAIT_MS, ScatterSession } from "./scatter-session.ts";

export interface GatherOptions {
  listen: { host: string; port: number };
  vms: Array<{ name: string; qmp: string }>;
  psk: Uint8Array;
  /** TLS under the key, for the scatter's connection and the relays'; none by default. */
  tls?: TlsFiles | null;
  /** Bytes per second the gather receives at most, from the scatter and relays together. */
  maxRate?: number;
  /** Bytes per second for each destination's background push after switchover. */
  postcopyBandwidth?: number;
  /** Threads that check the scatter's pages against their digests; none (0, the default): this one does. */
  digestThreads?: number;
  /** Where each VM's state is saved once it runs here, for a gather restarted with --resume; null: not saved. */
  stateDir: string | null;
  /** Recover VMs whose gather died after they ran here, from their saved states, instead of listening for a scatter. */
  resume?: boolean;
  /**
   * How to start each VM's monitor holder (qmp/monitor-holder.ts), which
   * keeps a --resume possible even when the destination's main loop waits
   * for a page; it is run with the QMP address and its socket appended.
   * Unused without a state dir; without it, the gather talks to QEMU directly.
   */
  holderCommand?: string[];
  signal?: AbortSignal;
  log?: (line: string) => void;
  /** Called once the gather listens, with the port it got. */
  onListening?: (port: number) => void;
  /** Given, once it listens, what tells where each VM stands. */
  onProgress?: (source: ProgressSource) => void;
}

export interface GatherReport {
  ok: boolean;
  vms: ArrivalReport[];
  /** Bytes received, frames included: from the scatter directly, and from relays. */
  bytesFromScatter: number;
  bytesFromRelays: number;
  /** The most page bytes the gather held at once (pinned by the scatter, or owed to a destination). */
  peakHeldBytes: number;
  relays: FetcherStats["relays"];
  exitCode: number;
}

export async function runGather(options: GatherOptions): Promise<GatherReport> {
  const log = options.log ?? (() => {});
  // socket reads are garbage at once: collected often, they do not add up to the VM
  collectGarbageEvery(16 * 1024 * 1024);
  options.signal?.throwIfAborted();
  if (options.resume && options.stateDir === null) throw new SgmError("usage", "--resume needs the --state-dir the gather before it saved to");
  if (options.stateDir !== null) prepareStateDir(options.stateDir);
  const statePaths = new Map(options.vms.map((vm) => [vm.name, options.stateDir === null ? null : resumeStatePath(options.stateDir, vm.name, vm.qmp)]));
  const holder = (name: string): HolderPlan | null => {
    const statePath = statePaths.get(name);
    return statePath && options.holderCommand ? { command: options.holderCommand, socketPath: holderSocketPath(statePath) } : null;
  };
  let arrivals: VmArrival[];
  let toResume: Awaited<ReturnType<typeof openForResume>> | null = null;
  if (options.resume) {
    toResume = await openForResume(options.vms.map((vm) => ({ ...vm, statePath: statePaths.get(vm.name)!, holder: holder(vm.name) })), log);
    arrivals = [...toResume.ready.map((r) => r.arrival), ...toResume.done];
  } else arrivals = (await openDestinations(options.vms.map((vm) => ({ ...vm, holder: holder(vm.name) })), log)).map((d) => new VmArrival(d));
  const dests = arrivals.map((a) => a.dest);
  const shared: GatherShared = {
    arrivals: new Map(arrivals.map((a) => [a.name, a])),
    socketDir: mkdtempSync(join(tmpdir(), "sgm-gather-")),
    psk: options.psk,
    tls: options.tls ?? null,
    limiter: options.maxRate ? new RateLimiter(options.maxRate) : null,
    digestPool: digestPoolFor(options.digestThreads ?? 0),
    postcopyBandwidth: options.postcopyBandwidth,
    statePaths,
    log,
  };
  const sessions: ScatterSession[] = [];
  const onAbort = () => {
    const reason = asSgmError(options.signal?.reason ?? new SgmError("interrupted", "interrupted"));
    for (const a of shared.arrivals.values()) a.fail(reason);
  };
  options.signal?.addEventListener("abort", onAbort);

  let resumed: Promise<RelayFetcher[]> = Promise.resolve([]);
  let listener: PeerListener | null = null;
  if (toResume) resumed = resumeAll(toResume.ready, shared);
  else {
    try {
      listener = listenPeers({
        host: options.listen.host,
        port: options.listen.port,
        psk: options.psk,
        tls: options.tls,
        role: "gather",
        acceptRoles: ["scatter"],
        maxPayload,
        onConnection: (conn) => {
          log(`scatter connected from ${conn.remoteAddress}`);
          sessions.push(new ScatterSession(conn, shared));
        },
        onRejected: (address, err) => log(`dropped ${address}: ${err.message}`),
      });
      options.onListening?.(listener.port);
    } catch (err) {
      // nothing is arriving yet (the address is taken, or the caller failed): let go of everything and say why
      options.signal?.removeEventListener("abort", onAbort);
      listener?.close();
      for (const d of dests) d.close();
      shared.digestPool?.close();
      rmSync(shared.socketDir, { recursive: true, force: true });
      throw err;
    }
    log(`listening on ${options.listen.host}:${listener.port} for ${[...shared.arrivals.keys()].join(", ")}`);
  }

  options.onProgress?.(() => [...shared.arrivals.values()].map((a) => a.snapshot()));
  let fetchers: RelayFetcher[] = [];
  try {
    await Promise.all([...shared.arrivals.values()].map((a) => a.done));
  } finally {
    options.signal?.removeEventListener("abort", onAbort);
    listener?.close();
    // a VM that failed while its state was written lets go of pages only once written: the relays must hear of them first
    await Promise.all([...shared.arrivals.values()].map((a) => a.stateWritten));
    for (const s of sessions) s.close();
    const hungUp = Promise.all(sessions.map((s) => s.hangUp(HANG_UP_WAIT_MS)));
    fetchers = await resumed;
    for (const f of fetchers) f.close();
    for (const d of dests) d.close();
    shared.digestPool?.close();
    rmSync(shared.socketDir, { recursive: true, force: true });
    await hungUp;
  }
  const reports = [...[...shared.arrivals.values()].map((a) => a.report()), ...(toResume?.unresumable ?? []).map(unresumableReport)];
  const failures = reports.filter((r) => !r.ok);
  const relays = [...sessions.map((s) => s.fetcher), ...fetchers].flatMap((f) => f.stats.relays);
  return {
    ok: failures.length === 0,
    vms: reports,
    bytesFromScatter: sessions.reduce((n, s) => n + s.conn.bytesReceived - s.probeBytes, 0),
    bytesFromRelays: relays.reduce((n, r) => n + r.bytesIn, 0),
    peakHeldBytes: sessions.reduce((n, s) => n + s.peakHeldBytes, 0),
    relays,
    exitCode: failures.length === 0 ? 0 : Math.max(...failures.map((r) => r.exitCode ?? 70)),
  };
}

async function openDestinations(vms: ReadonlyArray<{ name: string; qmp: string; holder: HolderPlan | null }>, log: (line: string) => void): Promise<DestinationQemu[]> {
  const opened = await Promise.allSettled(vms.map((vm) => DestinationQemu.open(vm.name, parseQmpAddress(vm.qmp), vm.holder, log)));
  const dests = opened.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
  const refused = opened.find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (refused) {
    for (const d of dests) d.close();
    throw asSgmError(refused.reason);
  }
  return dests;
}
