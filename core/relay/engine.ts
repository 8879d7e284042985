// The relay role: holds pages in memory for gathers that cannot take them
// yet. Scatters put pages under their run's id, gathers get and release
// them; a run idle for longer than the TTL loses its pages, so a run whose
// gather never came does not hold the relay's memory for ever.

import { PageStore } from "../dedup/page-store.ts";
import { availableMemoryBytes } from "../dedup/slab-memory.ts";
import { formatBytes } from "../units.ts";
import { digestPoolFor } from "../dedup/hash-threads.ts";
import { collectGarbageEvery } from "../net/garbage.ts";
import { SgmError } from "../errors.ts";
import type { PeerConnection, TlsFiles } from "../wire/connection.ts";
import { listenPeers } from "../wire/peer-listener.ts";
import { maxPayload } from "../wire/messages.ts";
import { RateLimiter } from "../net/rate-limiter.ts";
import { RunHolds } from "./holds.ts";
import { type RelayCounters, RelaySession } from "./session.ts";

export interface RelayOptions {
  host: string;
  /** 0 for any free port; the relay's `port` says which. */
  port: number;
  psk: Uint8Array;
  /** TLS under the key on every connection; none by default. */
  tls?: TlsFiles | null;
  capacityBytes: number;
  /** Take at most this many bytes a second from all clients together (a slow link, for tests); none by default. */
  maxRate?: number;
  /** A run that has not put or released for this long loses its pages. */
  ttlMs: number;
  /** How often expired runs are looked for; by default a quarter of the TTL, within 10 ms to 10 s. */
  sweepMs?: number;
  log?: (line: string) => void;
  /** Aborting stops the relay, as close() does. */
  signal?: AbortSignal;
  /** Threads that check PUT pages against their digests (default 0: the relay's one thread does). */
  digestThreads?: number;
  /** The store to hold pages in (one made resident by preallocatedStore()); by default a new one of capacityBytes. */
  store?: PageStore;
}

export interface RelayStats {
  capacity: number;
  /** Bytes of distinct pages held. */
  used: number;
  /** The most bytes held at once. */
  peakUsed: number;
  /** Bytes runs have reserved and not filled. */
  reserved: number;
  pages: number;
  /** Bytes of pages held only because an evacuation keeps them: room a run may take. */
  spare: number;
  /** Runs holding at least one page. */
  runs: number;
  /** Page bytes of accepted PUT entries (a page put twice counts twice). */
  bytesIn: number;
  /** Page bytes sent in PAGES replies. */
  bytesOut: number;
  refusedPages: number;
  /** Runs whose pages were dropped by the TTL. */
  expiredRuns: number;
  connections: number;
  /** Reply bytes waiting in the relay for clients to read them. */
  queuedBytes: number;
}

export interface Relay {
  readonly port: number;
  stats(): RelayStats;
  /** Set once drain() is called. */
  readonly draining: boolean;
  /**
   * Takes no new run (its room shows as 0, its pages and reservations are
   * refused) and resolves once every run it holds has been released or has
   * expired; the relay still serves them until then.
   */
  drain(): Promise<void>;
  /** Stops listening and ends every connection; the pages are gone. */
  close(): Promise<void>;
  /** Resolves once the relay has stopped, whoever stopped it. */
  readonly closed: Promise<void>;
}

/** How long close() lets connections flush their replies before it cuts them. */
const CLOSE_GRACE_MS = 1000;

/** Slabs made resident in one turn of the event loop (64 MiB): a signal is heard between turns. */
const PREALLOC_SLABS_PER_TURN = 16;

/**
 * A store for a relay of `capacityBytes`, all of it resident before the
 * relay listens. The first run through a relay filled memory its process
 * never touched: faulting it in and zeroing it cost the relay more than
 * the pages did (test/benchmarks/cost.bench.ts, 1 GiB through two relays:
 * 7.0 to 8.1 CPU-s per GiB on a relay's first run, 3.8 to 5.1 with its
 * capacity made resident at start). Refused ("insufficient") when the host
 * has less memory available than the capacity; stopped by `signal`.
 */
export async function preallocatedStore(capacityBytes: number, signal: AbortSignal | undefined, log: (line: string) => void): Promise<PageStore> {
  const available = availableMemoryBytes();
  if (available !== null && capacityBytes > available) {
    throw new SgmError("insufficient", `--prealloc: the capacity, ${formatBytes(capacityBytes)}, is more than the ${formatBytes(available)} of memory this host has available`);
  }
  const store = new PageStore({ capacityBytes });
  const started = performance.now();
  log(`making ${formatBytes(capacityBytes)} resident for pages (--prealloc)`);
  while (store.preallocate(PREALLOC_SLABS_PER_TURN) > 0) {
    await new Promise((resolve) => setImmediate(resolve));
    signal?.throwIfAborted();
  }
  log(`made ${formatBytes(store.slabBytes)} resident in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  return store;
}

/** Listens at once (a listen failure throws an "unavailable" SgmError) and serves until closed. */
export function startRelay(options: RelayOptions): Relay {
  if (!(options.ttlMs > 0)) throw new SgmError("internal", `relay TTL of ${options.ttlMs} ms`);
  const log = options.log ?? (() => {});
  // Its pages are in slabs, outside the collected heap, so a collection is
  // cheap; without them what Bun's socket reads leave piles up and is
  // faulted in anew (relay benchmark, third round: 7606 to 28166 page
  // faults per GiB and a 689 to 746 MiB peak, against 396 to 3548 and 622
  // to 626 MiB with them, and no less CPU).
  collectGarbageEvery(16 * 1024 * 1024);
  const store = options.store ?? new PageStore({ capacityBytes: options.capacityBytes });
  if (store.capacityBytes !== options.capacityBytes) throw new SgmError("internal", `relay of ${options.capacityBytes} bytes given a store of ${store.capacityBytes}`);
  const holds = new RunHolds(store, options.ttlMs);
  const counters: RelayCounters = { bytesIn: 0, bytesOut: 0, refusedPages: 0 };
  // a burst of 10 ms: a rate probe of 100 ms then sees the rate, not the bucket
  const limiter = options.maxRate ? new RateLimiter(options.maxRate, Math.max(64 * 1024, options.maxRate / 100)) : null;
  const digestPool = digestPoolFor(options.digestThreads ?? 0);
  const shared = { store, holds, counters, limiter, digestPool, now: () => performance.now() };
  const connections = new Set<PeerConnection>();
  let expiredRuns = 0;

  const listener = listenPeers({
    host: options.host,
    port: options.port,
    psk: options.psk,
    tls: options.tls,
    role: "relay",
    acceptRoles: ["scatter", "gather"],
    maxPayload,
    onConnection: (conn) => {
      connections.add(conn);
      log(`${conn.peerRole} connected from ${conn.remoteAddress}`);
      new RelaySession(conn, shared);
      void conn.closed.then((reason) => {
        connections.delete(conn);
        log(reason ? `${conn.peerRole} dropped: ${reason.message}` : `${conn.peerRole} ${conn.remoteAddress} disconnected`);
      });
    },
    onRejected: (address, err) => log(`refused ${address}: ${err.message}`),
  });

  const sweepMs = options.sweepMs ?? Math.min(10_000, Math.max(10, options.ttlMs / 4));
  const sweeper = setInterval(() => {
    for (const { run, pages, keeper } of holds.expire(shared.now())) {
      if (keeper) {
        // not its id: that is the evacuation's secret
        log(`an evacuation idle for ${options.ttlMs / 1000} s: dropped the ${pages} pages kept for it`);
        continue;
      }
      expiredRuns++;
      log(`run ${run} idle for ${options.ttlMs / 1000} s: released its ${pages} pages`);
    }
  }, sweepMs);

  let draining: Promise<void> | undefined;
  let drainTimer: Timer | undefined;
  const drain = (): Promise<void> => {
    draining ??= new Promise<void>((resolve) => {
      holds.closeToNewRuns();
      log(`draining: no new runs; waiting for the ${holds.runCount} held to finish`);
      const check = (): void => {
        // a scatter still connected may put for a run whose pages its gather has all released so far
        if (holds.runCount > 0 || [...connections].some((conn) => conn.peerRole === "scatter")) return;
        clearInterval(drainTimer);
        resolve();
      };
      // runs end by the gathers' releases or the TTL, on any connection: looked at often, it costs little
      drainTimer = setInterval(check, 100);
      check();
    });
    return draining;
  };

  let stopping: Promise<void> | undefined;
  let markClosed!: () => void;
  const closed = new Promise<void>((resolve) => {
    markClosed = resolve;
  });
  const close = (): Promise<void> => {
    stopping ??= (async () => {
      clearInterval(sweeper);
      clearInterval(drainTimer);
      options.signal?.removeEventListener("abort", onAbort);
      listener.close();
      const open = [...connections];
      for (const conn of open) conn.close();
      // A client that stopped reading never finishes its close; it is cut after the grace.
      let timer: Timer | undefined;
      await Promise.race([Promise.all(open.map((conn) => conn.closed)), new Promise((resolve) => (timer = setTimeout(resolve, CLOSE_GRACE_MS)))]);
      clearTimeout(timer);
      for (const conn of open) conn.abort(new SgmError("unavailable", `${conn.remoteAddress}: relay stopped`));
      digestPool?.close();
      markClosed();
    })();
    return stopping;
  };
  const onAbort = (): void => void close();
  if (options.signal?.aborted) onAbort();
  else options.signal?.addEventListener("abort", onAbort);

  return {
    port: listener.port,
    stats: () => ({
      capacity: store.capacityBytes,
      used: store.usedBytes,
      peakUsed: store.peakBytes,
      reserved: holds.outstandingBytes,
      pages: store.pages,
      spare: store.spareBytes,
      runs: holds.runCount,
      bytesIn: counters.bytesIn,
      bytesOut: counters.bytesOut,
      refusedPages: counters.refusedPages,
      expiredRuns,
      connections: connections.size,
      queuedBytes: [...connections].reduce((sum, conn) => sum + conn.queuedBytes, 0),
    }),
    get draining() {
      return draining !== undefined;
    },
    drain,
    close,
    closed,
  };
}
