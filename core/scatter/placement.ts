// Where each new page content goes, for all VMs of one scatter run: straight
// to the gather while its connection takes it (TCP backpressure is the
// signal), otherwise to the relays that rank highest for the page's digest
// (rendezvous hashing, --replicas of them). Content seen before in the run
// is not placed again while the gather or relays hold it: one digest index
// serves every VM. What the gather holds only for that is bounded
// (gather-pins.ts). Content another run of an evacuation put on a relay this
// run uses is held there for this run too (relay-contents.ts), not sent again.

import { DIGEST_BYTES } from "../dedup/digest.ts";
import { DigestIndex } from "../dedup/digest-index.ts";
import { rankRelays, relaySalt } from "../placement/rendezvous.ts";
import type { PeerConnection } from "../wire/connection.ts";
import { encodeDigests, FrameType, LocationList } from "../wire/messages.ts";
import { ContentHolders } from "./content-holders.ts";
import { DirectPages } from "./direct-pages.ts";
import { GatherPins, type MapProgress } from "./gather-pins.ts";
import { type Refused, RelayLink } from "./relay-link.ts";
import type { RelayContents } from "./relay-contents.ts";

/**
 * With relays, new content goes straight to the gather only while less than
 * this is sent and not yet taken in by it. The window is what must drain
 * before switchover, so it is kept small: at a 32 MiB/s destination, 1 MiB
 * is 30 ms of downtime at worst, and still far above the bandwidth-delay
 * product of any link a gather sits behind.
 */
const DIRECT_WINDOW = 1024 * 1024;
/** A relay whose connection queues more than this takes no new pages for now. */
const RELAY_WINDOW = 8 * 1024 * 1024;
/** The source is read no further while the gather queues this much and no relay takes pages. */
const GATHER_HIGH = 8 * 1024 * 1024;
/**
 * Content pinned at the gather for dedup, in pages (32 MiB), enough to
 * catch what repeats within and across the VMs of a run. The gather holds
 * it apart from what it owes its destinations (see its engine).
 */
export const GATHER_PIN_PAGES = 8192;

export interface PlacementStats {
  directPages: number;
  relayedPages: number;
  dedupPages: number;
  /** New to this run, but on a relay already for another run of the evacuation: held there for this one too, not sent (replicas counted on each relay). */
  sharedPages: number;
  replacedPages: number;
}

export class RunPlacement {
  readonly gather: PeerConnection;
  readonly relays: RelayLink[] = [];
  readonly replicas: number;
  readonly stats: PlacementStats = { directPages: 0, relayedPages: 0, dedupPages: 0, sharedPages: 0, replacedPages: 0 };
  private readonly index = new DigestIndex();
  private readonly holders = new ContentHolders();
  private readonly salts: number[] = [];
  private readonly relayContents: RelayContents | null;
  /** Each relay's bit in relayContents' masks. */
  private readonly contentBits: number[] = [];
  private readonly weights: number[] = [];
  private readonly direct: DirectPages;
  private readonly locations = new LocationList();
  /** One content's digest at a time, copied out of the index. */
  private readonly digestScratch = new Uint8Array(DIGEST_BYTES);
  private readonly rank: number[] = [];
  /** A page's best relays by room, while rankForPut looks past one that lags. */
  private readonly best: number[] = [];
  private readonly hasRoom = (r: number): boolean => this.relays[r]!.hasRoom;
  private readonly accepting = (r: number): boolean => this.relays[r]!.accepting;
  private readonly ackListeners = new Set<(replaced: boolean) => void>();
  private readonly drainWaiters: Array<() => void> = [];
  private failure: Error | null = null;
  private readonly failListeners = new Set<(reason: Error) => void>();
  private readonly lossListeners = new Set<(why: string) => void>();
  private stillNeeded: () => boolean = () => false;
  private readonly pins: GatherPins;
  /** False (--no-dedup) to send held content again wherever it recurs, for measuring what dedup saves. */
  private readonly dedup: boolean;
  private readonly log: (line: string) => void;

  constructor(
    gather: PeerConnection,
    replicas: number,
    options: { gatherPinPages?: number; dedup?: boolean; relayContents?: RelayContents; log?: (line: string) => void } = {},
  ) {
    this.gather = gather;
    this.log = options.log ?? (() => {});
    this.replicas = replicas;
    this.dedup = options.dedup ?? true;
    this.relayContents = options.relayContents ?? null;
    const gatherPinPages = options.gatherPinPages ?? GATHER_PIN_PAGES;
    this.pins = new GatherPins(gatherPinPages);
    this.direct = new DirectPages(gather);
  }

  /**
   * The open map frames should go now: a quarter of the pin budget waits
   * for them to be unpinned. A RAM section (and so a map frame) can run to
   * MAP_BATCH pages, and the gather would hold them all besides the budget.
   */
  get unpinsWaitForMap(): boolean {
    return this.pins.undecidedUnpins >= Math.max(1, this.pins.budget >> 2);
  }

  /** The gather reports how much direct content it has taken in. */
  gatherReceived(bytes: number): void {
    this.direct.taken(bytes);
    this.wakeDrainWaiters();
  }

  /** A relay with `room` bytes free: its share of the pages relayed is its share of the room. */
  addRelay(address: string, conn: PeerConnection, run: Uint8Array, room: number): void {
    const keeper = this.dedup ? (this.relayContents?.keeper ?? null) : null;
    const link = new RelayLink(this.relays.length, address, conn, run, keeper, {
      onAck: (stored, refused, held) => this.onAck(link, stored, refused, held),
      onFull: () => {},
      onLost: (reason, unplaced) => this.relayLost(link, reason, unplaced),
      stillNeeded: () => this.stillNeeded(),
    });
    this.relays.push(link);
    this.contentBits.push(this.relayContents?.relayBit(address) ?? 0);
    this.salts.push(relaySalt(address));
    this.weights.push(room);
  }

  /**
   * While `check` holds, a relay whose connection closes counts as lost,
   * even with nothing in flight to it: what it held is gone, and a VM still
   * to place pages (one waiting for a slot included) may name it.
   */
  neededWhile(check: () => boolean): void {
    this.stillNeeded = check;
  }

  /** Distinct contents the run has placed. */
  get contents(): number {
    return this.index.size;
  }

  /** The digest of placed content `cid`; a view, good until the next place. */
  digestOf(cid: number): Uint8Array {
    return this.index.digestOf(cid);
  }

  /** Copies the digest of placed content `cid` to out[at .. at + 32). */
  copyDigest(cid: number, out: Uint8Array, at: number): void {
    this.index.copyDigest(cid, out, at);
  }

  /**
   * Places the content whose digest is at `digest[at..]` unless the run has
   * placed it before; new content is copied out at once. Returns its id.
   */
  place(digest: Uint8Array, at: number, page: Uint8Array): number {
    const known = this.index.lookup(digest, at);
    // --no-dedup sends held content again, once no copy of it is in flight
    // to relays (a map entry naming it waits for exactly those copies)
    if (known >= 0 && this.isHeld(known) && (this.dedup || this.holders.pendingOf(known) > 0)) {
      this.stats.dedupPages++;
      this.pins.touch(known);
      return known;
    }
    const cid = known >= 0 ? known : this.index.insert(digest, at);
    this.holders.grow(cid);
    this.put(cid, digest, at, page);
    return cid;
  }

  /** A VM's page pipeline registers the progress of its map entries (UNPINs wait for them). */
  mapStream(): MapProgress {
    return this.pins.mapStream();
  }

  /** A lost relay took the only copy of the content, and it has not been placed again. */
  isLost(cid: number): boolean {
    return this.holders.isLost(cid);
  }

  /** The gather or relays hold the content (or will, once acknowledged): a reference to it is enough. */
  private isHeld(cid: number): boolean {
    return this.pins.isPinned(cid) || this.holders.maskOf(cid) !== 0 || this.holders.pendingOf(cid) > 0;
  }

  /**
   * A page the destination waits for: its content goes to the gather now,
   * unless the gather has it or a relay holds it already. Returns its id.
   */
  placeUrgent(digest: Uint8Array, at: number, page: Uint8Array): number {
    let cid = this.index.lookup(digest, at);
    if (cid >= 0 && this.holders.pendingOf(cid) === 0 && this.isHeld(cid)) {
      this.stats.dedupPages++;
      this.pins.touch(cid);
    } else {
      if (cid < 0) {
        cid = this.index.insert(digest, at);
        this.holders.grow(cid);
      }
      this.stats.directPages++;
      this.sendDirect(cid, digest, at, page);
    }
    // its map entry goes at once, and the bytes of content pinned at the
    // gather may still lie in the frame being built: they go first
    this.direct.flush();
    return cid;
  }

  /** Sends the UNPINs whose map entries have all gone before them. */
  flushUnpins(): void {
    const ready = this.pins.takeReady();
    if (ready.length === 0) return;
    try {
      // the bytes of content being unpinned must reach the gather first
      this.direct.flush();
      for (let i = 0; i < ready.length; i += 16384) {
        this.gather.send(FrameType.UNPIN, encodeDigests(ready.slice(i, i + 16384).map((cid) => this.index.digestOf(cid))));
      }
    } catch {
      // the gather is gone: its connection reports that, and it holds nothing now
    }
  }

  /** Sends every batch being built: direct pages, relay PUTs. */
  flush(): void {
    this.direct.flush();
    for (const link of this.relays) link.flush();
  }

  /** PUT batches sent per relay so far: a map frame may go once these are acknowledged. */
  sentMarks(): number[] {
    return this.relays.map((r) => r.sentSeq);
  }

  isAcked(marks: readonly number[]): boolean {
    // a lost relay's pages went elsewhere, in batches later marks wait for
    return marks.every((mark, r) => this.relays[r]!.acked >= mark || this.relays[r]!.lostReason !== null);
  }

  /**
   * After a refusal the content went into later batches: a mark taken
   * before then must wait for those too.
   */
  raiseMarks(marks: number[]): void {
    for (let r = 0; r < marks.length; r++) marks[r] = Math.max(marks[r]!, this.relays[r]!.sentSeq);
  }

  /** Tells the gather where relayed content is held; due before any map entry naming it. */
  sendLocations(): void {
    if (this.locations.length === 0) return;
    for (const payload of this.locations.take()) this.gather.send(FrameType.LOCATIONS, payload);
  }

  /**
   * Called after every acknowledgement, so map frames waiting on it can go;
   * `replaced` when refused pages were placed again (in later batches).
   */
  onAcked(listener: (replaced: boolean) => void): () => void {
    this.ackListeners.add(listener);
    return () => this.ackListeners.delete(listener);
  }

  onFailure(listener: (reason: Error) => void): () => void {
    if (this.failure) listener(this.failure);
    this.failListeners.add(listener);
    return () => this.failListeners.delete(listener);
  }

  /** Too much waits to go anywhere: the source should not be read further for now. */
  get congested(): boolean {
    if (this.relays.length === 0 ? this.gather.queuedBytes <= GATHER_HIGH : this.gatherAccepting) return false;
    return this.relays.filter((r) => r.accepting && r.queuedBytes <= RELAY_WINDOW).length < this.replicas;
  }

  private get gatherAccepting(): boolean {
    return this.direct.within(DIRECT_WINDOW);
  }

  /** Resolves once not congested. */
  whenUncongested(): Promise<void> {
    if (!this.congested) return Promise.resolve();
    return new Promise((resolve) => {
      this.drainWaiters.push(resolve);
      void this.gather.whenWritable(GATHER_HIGH / 2).then(() => this.wakeDrainWaiters(), () => this.wakeDrainWaiters());
      for (const r of this.relays) void r.conn.whenWritable(RELAY_WINDOW / 2).then(() => this.wakeDrainWaiters(), () => {});
    });
  }

  private wakeDrainWaiters(): void {
    if (this.congested && !this.failure) return;
    for (const w of this.drainWaiters.splice(0)) w();
  }

  private put(cid: number, digest: Uint8Array, at: number, page: Uint8Array): void {
    this.holders.placed(cid);
    if (this.holdOnRelays(cid, digest, at, page)) return;
    const n = this.relays.length === 0 || this.gatherAccepting ? 0 : this.rankForPut(digest, at);
    if (n < this.replicas) {
      // the gather takes it: either it keeps up, or not enough relays can
      // hold --replicas copies now (and the source waits)
      this.stats.directPages++;
      this.sendDirect(cid, digest, at, page);
      return;
    }
    // Nothing of this content is in flight (pending 0). With --no-dedup,
    // relays may hold it already: the mask keeps them, and the gather merges
    // the locations it is told.
    this.holders.sending(cid, n);
    this.stats.relayedPages++;
    for (let i = 0; i < n; i++) this.relays[this.rank[i]!]!.add(cid, digest, at, page);
  }

  /**
   * The relays a new page goes to, in this.rank; none when it goes to the
   * gather. The best by room, unless one lags: then the best of those not
   * lagging, if each queues little enough. What lag moves is counted apart
   * from what room gives (RelayLink.pagesRanked).
   */
  private rankForPut(digest: Uint8Array, at: number): number {
    const relays = this.relays;
    const replicas = this.replicas;
    // too few with room for --replicas copies: no relay was passed over
    if (rankRelays(digest, at, this.salts, this.hasRoom, replicas, this.rank, this.weights) < replicas) return 0;
    let takeIt = true;
    for (let i = 0; i < replicas; i++) {
      const link = relays[this.rank[i]!]!;
      link.pagesRanked++;
      this.best[i] = link.index;
      if (!link.accepting || link.queuedBytes > RELAY_WINDOW) takeIt = false;
    }
    if (takeIt) return replicas;
    const ranked = rankRelays(digest, at, this.salts, this.accepting, replicas, this.rank, this.weights);
    let queuesLittle = ranked === replicas;
    for (let i = 0; i < ranked; i++) if (relays[this.rank[i]!]!.queuedBytes > RELAY_WINDOW) queuesLittle = false;
    const n = queuesLittle ? replicas : 0;
    for (let i = 0; i < replicas; i++) {
      const r = this.best[i]!;
      let placed = false;
      for (let k = 0; k < n; k++) if (this.rank[k] === r) placed = true;
      if (!placed) relays[r]!.pagesPassed++;
    }
    return n;
  }

  /**
   * Content another run put on relays this run uses: held there for this
   * run too, by digest, if --replicas of them can take it now. A relay that
   * no longer has it refuses, and the page is placed as new content.
   */
  private holdOnRelays(cid: number, digest: Uint8Array, at: number, page: Uint8Array): boolean {
    if (!this.relayContents || !this.dedup) return false;
    const mask = this.relayContents.maskOf(digest, at);
    if (mask === 0) return false;
    let n = 0;
    for (let r = 0; r < this.relays.length && n < this.replicas; r++) {
      const link = this.relays[r]!;
      if ((mask & this.contentBits[r]!) !== 0 && link.accepting && link.queuedBytes <= RELAY_WINDOW) this.rank[n++] = r;
    }
    if (n < this.replicas) return false;
    this.holders.sending(cid, n);
    for (let i = 0; i < n; i++) this.relays[this.rank[i]!]!.addHold(cid, digest, at, page);
    return true;
  }

  private sendDirect(cid: number, digest: Uint8Array, at: number, page: Uint8Array): void {
    this.holders.placed(cid);
    this.pins.pin(cid);
    if (this.direct.add(page, digest, at)) this.flush();
  }

  private onAck(link: RelayLink, stored: number[], refused: Refused[], held: boolean): void {
    if (held) this.stats.sharedPages += stored.length;
    const digest = this.digestScratch;
    for (const cid of stored) {
      this.index.copyDigest(cid, digest, 0);
      this.relayContents?.held(this.contentBits[link.index]!, digest, 0);
      if (this.holders.stored(cid, link.index) === 0) this.locations.add(digest, 0, this.holders.maskOf(cid));
    }
    this.placeElsewhere(link, refused);
    if (refused.length > 0) this.flush();
    for (const listener of this.ackListeners) listener(refused.length > 0);
    this.wakeDrainWaiters();
  }

  /**
   * A relay went while the run needed it: what it had not acknowledged is
   * placed elsewhere, and it counts no more as a holder. Content it held the
   * only copy of (--replicas 1, or a replica that found no room elsewhere)
   * is no longer held: the run's listeners hear of it (a VM not yet evicted
   * has its source send its memory again), and should the source send it
   * again, it is placed anew.
   */
  private relayLost(link: RelayLink, reason: Error, unplaced: Refused[]): void {
    // a run already failing or ending (its connections closing) places nothing more
    if (this.failure || !this.gather.isOpen) return this.fail(reason);
    try {
      this.goOnWithout(link, reason, unplaced);
    } catch (err) {
      this.fail(err instanceof Error ? err : new Error(String(err)));
    }
  }

  private goOnWithout(link: RelayLink, reason: Error, unplaced: Refused[]): void {
    const alone = this.holders.dropRelay(link.index, (cid) => this.pins.isPinned(cid));
    this.relayContents?.forgetRelay(this.contentBits[link.index]!);
    const lost = alone > 0 ? `; it held the only copy of ${alone} contents` : "";
    this.log(`${reason.message}${lost}; ${unplaced.length} pages it had not acknowledged go elsewhere`);
    this.placeElsewhere(link, unplaced);
    this.flush();
    for (const listener of this.ackListeners) listener(true);
    if (alone > 0) for (const listener of this.lossListeners) listener(`${reason.message}, with the only copy of ${alone} contents`);
    this.wakeDrainWaiters();
  }

  /** The gather lost the relay at `address`: the run counts it as gone too. */
  relayGone(address: string, reason: string): void {
    const link = this.relays.find((r) => r.address === address);
    if (!link || link.lostReason !== null || !this.stillNeeded()) return;
    link.lose(`relay ${address}: the gather lost it (${reason})`);
  }

  /** Called when a lost relay took the only copy of some content with it (see relayLost). */
  onContentLost(listener: (why: string) => void): () => void {
    this.lossListeners.add(listener);
    return () => this.lossListeners.delete(listener);
  }

  /** Pages a relay refused or lost: each to another relay not holding it, or to the gather. */
  private placeElsewhere(link: RelayLink, refused: Refused[]): void {
    for (const r of refused) {
      // place this replica elsewhere: another relay not holding it, or the gather
      this.stats.replacedPages++;
      if (r.wasHold) this.relayContents?.forget(this.contentBits[link.index]!, r.digest, 0);
      const n = rankRelays(
        r.digest,
        0,
        this.salts,
        // not where a copy is already, or on its way
        (i) => i !== link.index && !this.holders.holds(r.cid, i) && this.relays[i]!.accepting && !this.relays[i]!.hasPending(r.cid),
        1,
        this.rank,
        this.weights,
      );
      if (n > 0) {
        this.relays[this.rank[0]!]!.add(r.cid, r.digest, 0, r.page);
      } else if (this.holders.unplaced(r.cid) === 0) {
        if (this.holders.maskOf(r.cid) === 0) {
          // no relay holds it: the gather gets it directly
          this.sendDirect(r.cid, r.digest, 0, r.page);
        } else {
          this.index.copyDigest(r.cid, this.digestScratch, 0);
          this.locations.add(this.digestScratch, 0, this.holders.maskOf(r.cid));
        }
      }
    }
  }

  private fail(reason: Error): void {
    if (this.failure) return;
    this.failure = reason;
    for (const listener of this.failListeners) listener(reason);
    this.wakeDrainWaiters();
  }
}
