// Gets relayed content for the gather. A page the destination is waiting
// for goes out at once in a GET of its own; everything else is fetched in
// large batches as the gather's rate allows. Every page is checked against
// its digest before it is kept, and relays are told to drop what the gather
// no longer needs.

import { DIGEST_BYTES, PAGE_BYTES, digestPage, digestPages, sameDigest } from "../dedup/digest.ts";
import { IdSet } from "../dedup/id-set.ts";
import { SgmError } from "../errors.ts";
import { parseHostPort } from "../net/host-port.ts";
import type { RateLimiter } from "../net/rate-limiter.ts";
import { PeerConnection, type TlsFiles } from "../wire/connection.ts";
import { maxPayload } from "../wire/messages.ts";
import { encodeDigestRequest, encodeRelease, everyPageFound, readPages, RELEASE_BATCH, RelayFrame } from "../wire/relay-messages.ts";
import type { ContentDirectory } from "./content-directory.ts";

/** Background GETs in flight per relay. */
export const FETCH_WINDOW = 8;
/** Digests a background GET asks for. */
export const FETCH_BATCH = 64;
/**
 * Background fetches wait while the gather holds this much that its
 * destinations have yet to take, so a destination slower than the relays
 * does not make the gather hold the VM. At 28 MiB a 1 GiB eviction through
 * two relays peaked at 246 to 260 MiB resident; at 20 MiB, 227 to 249, its
 * eviction no later (four runs of each, alternated).
 */
const FETCH_HIGH = 20 * 1024 * 1024;

interface Relay {
  address: string;
  /** Null for a relay a resumed gather could not reach. */
  conn: PeerConnection | null;
  /** Content ids to fetch from this relay in the background, in the order asked. */
  queue: number[];
  queueHead: number;
  inFlight: number;
  /** Digests to release, `released` of them, sent when full or when nothing else goes on. */
  releases: Uint8Array;
  released: number;
  bytesIn: number;
  pages: number;
}

export interface FetcherHandlers {
  /** A relay broke the protocol, or sent a page unlike its digest. */
  error(err: Error): void;
  /**
   * A relay went, with every relay lost so far (a bit each); heard before
   * anything is asked again, so the VMs that needed what only those relays
   * held fail first and want none of it.
   */
  lost(address: string, reason: string, lost: number): void;
  /**
   * No live relay holds this content (any more): the VMs that need it
   * cannot finish, unless `relayGone` (only lost relays had it: the scatter
   * hears of those, and a source may send it again).
   */
  unreachable(cid: number, why: string, relayGone: boolean): void;
}

export interface FetcherStats {
  relays: Array<{ address: string; pagesFetched: number; bytesIn: number }>;
  urgentFetches: number;
}

export class RelayFetcher {
  private readonly dir: ContentDirectory;
  private readonly limiter: RateLimiter | null;
  private readonly onError: (err: Error) => void;
  private readonly onLost: FetcherHandlers["lost"];
  private readonly onUnreachable: FetcherHandlers["unreachable"];
  private relays: Relay[] = [];
  private run: Uint8Array = new Uint8Array(16);
  /** Content ids asked for and not arrived yet (ids are dense: a bit each, not a Set's hashing per page). */
  private readonly wanted = new IdSet();
  private nextReq = 1;
  /** GET requests in flight: the relay asked and the digests asked for. */
  private readonly requests = new Map<number, { relay: number; digests: Uint8Array }>();
  /** The digests of a reply's pages, computed here. */
  private computed = new Uint8Array(0);
  private readonly tried = new Map<number, number>();
  /** Relays whose connection is gone (a bit per relay). */
  private lost = 0;
  /** Content wanted, and given up on when no live relay held it. */
  private readonly abandoned = new IdSet();
  private closing = false;
  private pumpTimer: ReturnType<typeof setTimeout> | null = null;
  private waitingForRoom = false;
  private keepAlive: ReturnType<typeof setInterval> | null = null;
  private urgentFetches = 0;

  constructor(dir: ContentDirectory, limiter: RateLimiter | null, handlers: FetcherHandlers) {
    this.dir = dir;
    this.limiter = limiter;
    this.onError = handlers.error;
    this.onLost = handlers.lost;
    this.onUnreachable = handlers.unreachable;
  }

  /**
   * Connects to the run's relays, in the order their mask bits count them.
   * All must answer; or, `tolerant` (a resumed gather, whose relays may have
   * gone since), those that do: the others count as lost, and are returned
   * with why.
   */
  async connect(
    run: Uint8Array,
    addresses: readonly string[],
    psk: Uint8Array,
    tls: TlsFiles | null,
    tolerant = false,
  ): Promise<Array<{ index: number; address: string; reason: string }>> {
    this.run = run;
    const unreachable: Array<{ index: number; address: string; reason: string }> = [];
    this.relays = await Promise.all(
      addresses.map(async (address, index) => {
        const to = parseHostPort(address);
        if (!to) throw new SgmError("data", `scatter named relay '${address}'`);
        const conn = await PeerConnection.connect({ host: to.host, port: to.port, psk, tls, role: "gather", expectRole: "relay", maxPayload, timeoutMs: 10_000 }).catch(
          (err: Error) => {
            if (!tolerant) throw new SgmError("unavailable", `relay ${address}: ${err.message}`);
            unreachable.push({ index, address, reason: err.message });
            this.lost |= 1 << index;
            return null;
          },
        );
        const relay: Relay = { address, conn, queue: [], queueHead: 0, inFlight: 0, releases: new Uint8Array(0), released: 0, bytesIn: 0, pages: 0 };
        return relay;
      }),
    );
    // relays drop a run's pages once it has been idle for their TTL; an
    // empty RELEASE now and then says the run still needs them
    this.keepAlive = setInterval(() => {
      for (const relay of this.relays) {
        try {
          relay.conn?.send(RelayFrame.RELEASE, encodeRelease(this.run, new Uint8Array(0)));
        } catch {
          // a relay gone away is noticed through its connection
        }
      }
    }, 60_000);
    this.relays.forEach((relay, index) => {
      if (!relay.conn) return;
      relay.conn.onFrame((type, payload) => this.onFrame(index, type, payload));
      void relay.conn.closed.then((reason) => {
        if (!this.closing) this.onRelayLost(index, reason);
      });
    });
    return unreachable;
  }

  /** Relays lost so far, a bit each. */
  get lostMask(): number {
    return this.lost;
  }

  get stats(): FetcherStats {
    return { relays: this.relays.map((r) => ({ address: r.address, pagesFetched: r.pages, bytesIn: r.bytesIn })), urgentFetches: this.urgentFetches };
  }

  /** Makes sure the content comes; `urgent` when the destination waits for it. */
  want(cid: number, urgent: boolean): void {
    if (this.dir.isLocal(cid)) return;
    if (urgent) {
      this.urgentFetches++;
      this.wanted.add(cid);
      const r = this.pickRelay(cid);
      try {
        if (r >= 0) this.send(r, [cid]);
      } catch (err) {
        this.onError(err as Error);
      }
      return;
    }
    if (this.wanted.has(cid)) return;
    this.wanted.add(cid);
    const r = this.pickRelay(cid);
    if (r < 0) return;
    this.relays[r]!.queue.push(cid);
    this.pump();
  }

  /**
   * The scatter placed content on relays (again): if a fetch of it was
   * given up for want of a live holder, it is wanted once more.
   */
  located(cid: number): void {
    if (this.abandoned.delete(cid)) this.want(cid, false);
  }

  /** The gather no longer needs this content: no fetching it, and the relays holding it may drop it. */
  release(cid: number, mask: number): void {
    this.wanted.delete(cid);
    this.abandoned.delete(cid);
    this.forgetTried(cid);
    for (let i = 0; i < this.relays.length; i++) {
      const relay = this.relays[i]!;
      // a relay a resumed gather could not reach hears nothing: it drops the run's pages with its TTL
      if (!(mask & (1 << i)) || !relay.conn) continue;
      if (relay.releases.length === 0) relay.releases = new Uint8Array(RELEASE_BATCH * DIGEST_BYTES);
      this.dir.copyDigest(cid, relay.releases, relay.released++ * DIGEST_BYTES);
      if (relay.released === RELEASE_BATCH) this.flushReleases(relay);
    }
  }

  /** Sends pending releases (at the end, or when nothing else is going on). */
  flushAllReleases(): void {
    for (const relay of this.relays) this.flushReleases(relay);
  }

  close(): void {
    this.closing = true;
    this.flushAllReleases();
    if (this.pumpTimer) clearTimeout(this.pumpTimer);
    if (this.keepAlive) clearInterval(this.keepAlive);
    for (const relay of this.relays) relay.conn?.close();
  }

  /** Issues background GETs, a batch per relay at a time, while the rate, the windows and the gather's memory allow. */
  private pump(): void {
    if (this.dir.owedBytes >= FETCH_HIGH) {
      if (this.waitingForRoom) return;
      this.waitingForRoom = true;
      void this.dir.whenOwedBelow(FETCH_HIGH * 0.75).then(() => {
        this.waitingForRoom = false;
        this.pump();
      });
      return;
    }
    for (let progress = true; progress; ) {
      progress = false;
      for (let r = 0; r < this.relays.length; r++) {
        const relay = this.relays[r]!;
        if (relay.inFlight >= FETCH_WINDOW || relay.queueHead >= relay.queue.length) continue; // a reply will pump again
        if (this.limiter && (this.limiter.scatterWaiting || !this.limiter.has(FETCH_BATCH * 4096))) {
          this.pumpLater(this.limiter.waitMs() + 5);
          return;
        }
        const batch: number[] = [];
        while (relay.queueHead < relay.queue.length && batch.length < FETCH_BATCH) {
          const cid = relay.queue[relay.queueHead++]!;
          if (!this.wanted.has(cid)) continue;
          // its bytes came otherwise (the scatter sent them again, as with
          // --no-dedup): no longer wanted, so that if they are dropped and
          // needed again, want() queues a fetch instead of trusting this one
          if (this.dir.isLocal(cid)) this.wanted.delete(cid);
          else batch.push(cid);
        }
        if (relay.queueHead >= relay.queue.length) {
          relay.queue = [];
          relay.queueHead = 0;
        }
        if (batch.length === 0) continue;
        this.send(r, batch);
        progress = true;
      }
    }
  }

  private pumpLater(ms: number): void {
    if (this.pumpTimer) return;
    this.pumpTimer = setTimeout(() => {
      this.pumpTimer = null;
      this.pump();
    }, ms);
  }

  /**
   * A relay went away: what was asked of it or queued for it is asked of
   * the other relays holding it (with --replicas 2 and up, there are some).
   */
  private onRelayLost(index: number, reason: Error | undefined): void {
    const relay = this.relays[index]!;
    this.lost |= 1 << index;
    this.onLost(relay.address, reason?.message ?? "connection closed", this.lost);
    if (this.wanted.size === 0) return;
    const again: number[] = relay.queue.slice(relay.queueHead);
    relay.queue = [];
    relay.queueHead = 0;
    for (const [req, request] of this.requests) {
      if (request.relay !== index) continue;
      this.requests.delete(req);
      for (let at = 0; at < request.digests.length; at += DIGEST_BYTES) {
        const cid = this.dir.lookup(request.digests, at);
        if (cid >= 0) again.push(cid);
      }
    }
    relay.inFlight = 0;
    for (const cid of again) {
      if (!this.wanted.has(cid) || this.dir.isLocal(cid)) continue;
      if ((this.dir.relayMask(cid) & ~this.lost) === 0) {
        // only the lost relays had it: the VMs needing it failed or wait for it placed again (onLost)
        this.wanted.delete(cid);
        this.abandoned.add(cid);
        continue;
      }
      const r = this.pickRelay(cid);
      if (r >= 0) this.relays[r]!.queue.push(cid);
    }
    this.pump();
  }

  /**
   * The relay to ask: the first live holder not yet tried for this content;
   * -1 when there is none, and the VMs that need it hear so (unreachable).
   */
  private pickRelay(cid: number): number {
    const tried = this.tried.size === 0 ? 0 : (this.tried.get(cid) ?? 0);
    const mask = this.dir.relayMask(cid) & ~tried & ~this.lost;
    if (mask !== 0) return 31 - Math.clz32(mask & -mask);
    this.wanted.delete(cid);
    this.forgetTried(cid);
    this.abandoned.add(cid);
    const relayGone = (this.dir.relayMask(cid) & ~this.lost) === 0;
    this.onUnreachable(cid, `no relay holds page content ${this.hex(cid)} any more`, relayGone);
    return -1;
  }

  private send(relay: number, cids: number[]): void {
    const digests = new Uint8Array(cids.length * DIGEST_BYTES);
    cids.forEach((cid, n) => digests.set(this.dir.digestOf(cid), n * DIGEST_BYTES));
    const req = this.nextReq++;
    this.requests.set(req, { relay, digests });
    const r = this.relays[relay]!;
    r.inFlight++;
    r.conn!.send(RelayFrame.GET, encodeDigestRequest(this.run, req, digests));
  }

  private onFrame(index: number, type: number, payload: Uint8Array): void {
    if (type !== RelayFrame.PAGES) throw new SgmError("data", `relay ${this.relays[index]!.address} sent frame type ${type}`);
    const relay = this.relays[index]!;
    this.limiter?.take(payload.length);
    relay.bytesIn += payload.length;
    const missing: number[] = [];
    const check = new Uint8Array(DIGEST_BYTES);
    const req = payload.length >= 4 ? new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0) : -1;
    const request = this.requests.get(req);
    if (!request || request.relay !== index) throw new SgmError("data", `relay ${relay.address} answered request ${req}, which it was not sent`);
    // most replies hold every page asked for: those are hashed in one call
    const found = everyPageFound(payload);
    if (found) {
      if (this.computed.length < found.count * DIGEST_BYTES) this.computed = new Uint8Array(found.count * DIGEST_BYTES);
      digestPages(found.pages, found.stride, found.count, this.computed);
    }
    let n = 0;
    readPages(payload, (digestAt, pageAt) => {
      const entry = n++;
      const asked = entry * DIGEST_BYTES;
      if (!sameDigest(request.digests, asked, payload, digestAt)) throw new SgmError("data", `relay ${relay.address} answered for content it was not asked`);
      // content nobody needs any more is forgotten, and no lookup finds it: drop the reply
      const cid = this.dir.lookup(payload, digestAt);
      if (pageAt < 0) {
        if (cid >= 0) missing.push(cid);
        return;
      }
      let matches: boolean;
      if (found) matches = sameDigest(this.computed, entry * DIGEST_BYTES, payload, digestAt);
      else {
        digestPage(payload.subarray(pageAt, pageAt + PAGE_BYTES), check);
        matches = sameDigest(check, 0, payload, digestAt);
      }
      if (!matches) throw new SgmError("data", `relay ${relay.address} sent a page that does not match its digest`);
      relay.pages++;
      if (cid < 0) return;
      this.wanted.delete(cid);
      this.forgetTried(cid);
      this.dir.fetched(cid, payload, pageAt);
    });
    this.requests.delete(req);
    relay.inFlight--;
    for (const cid of missing) {
      // try the next replica; none left means the content is lost
      this.tried.set(cid, (this.tried.get(cid) ?? 0) | (1 << index));
      const r = this.pickRelay(cid);
      try {
        if (r >= 0) this.send(r, [cid]);
      } catch (err) {
        this.onError(err as Error);
      }
    }
    this.pump();
  }

  /** Relays tried for content are rare (a relay that lacked a page): most pages skip the map. */
  private forgetTried(cid: number): void {
    if (this.tried.size > 0) this.tried.delete(cid);
  }

  private flushReleases(relay: Relay): void {
    if (relay.released === 0 || !relay.conn) return;
    const count = relay.released;
    relay.released = 0;
    try {
      relay.conn.send(RelayFrame.RELEASE, encodeRelease(this.run, relay.releases.subarray(0, count * DIGEST_BYTES)));
    } catch {
      // a relay gone away drops the run's pages with its TTL
    }
  }

  private hex(cid: number): string {
    return Buffer.from(this.dir.digestOf(cid).subarray(0, 8)).toString("hex");
  }
}
