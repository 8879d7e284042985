// Scatter's connection to one relay: batches pages into PUT frames and keeps
// each batch until the relay acknowledges it, so a page the relay refused
// (it is full) can still be placed elsewhere. Content another run of the
// same evacuation put there goes as a HOLD of its digest instead; the page
// is kept the same way, for a relay that no longer has it.

import { DIGEST_BYTES } from "../dedup/digest.ts";
import { SgmError } from "../errors.ts";
import { trace } from "../trace.ts";
import type { PeerConnection } from "../wire/connection.ts";
import { decodeControl } from "../wire/control.ts";
import { FrameType } from "../wire/messages.ts";
import { encodeHoldOf, encodeKeepOf, PutBuilder, readAck, readPut, RelayFrame } from "../wire/relay-messages.ts";

/** A page the relay refused: its content id and where its digest and bytes still are. */
export interface Refused {
  cid: number;
  digest: Uint8Array;
  page: Uint8Array;
  /** Asked as a HOLD: the relay no longer has it (it is not full). */
  wasHold: boolean;
}

export interface RelayLinkEvents {
  /** A PUT or HOLD (`held`) was acknowledged: these content ids are now held (refused ones are not). */
  onAck(stored: number[], refused: Refused[], held: boolean): void;
  onFull(capacity: number, used: number): void;
  /** The relay went while the run needed it; `unplaced` are the pages it had not acknowledged, to place elsewhere. */
  onLost(reason: Error, unplaced: Refused[]): void;
  /** The run still places pages or names content (a VM not yet evicted, or not yet started): a relay gone is a loss. */
  stillNeeded(): boolean;
}

interface InFlight {
  kind: "put" | "hold";
  seq: number;
  buffer: Uint8Array;
  payload: Uint8Array;
  cids: number[];
}

/** Unacknowledged PUT batches a relay may have before it takes no more pages. */
export const MAX_IN_FLIGHT = 64;

export class RelayLink {
  readonly index: number;
  readonly address: string;
  readonly conn: PeerConnection;
  /** The relay refused a page: it gets no more. */
  full = false;
  /** Why the relay was lost while the run needed it; null while it serves. */
  lostReason: string | null = null;
  pagesPut = 0;
  pagesRefused = 0;
  /**
   * New pages meant for relays whose --replicas best by room (rendezvous)
   * included this one, and of those, pages placed elsewhere (another relay
   * or the gather) because it, or another of their best, lagged its
   * acknowledgements or queued too much on its connection: the first is
   * the share its room gives it, the second what lag took from that.
   */
  pagesRanked = 0;
  pagesPassed = 0;
  /** Pages of PUTs and HOLDs the relay has acknowledged storing. */
  private pagesStored = 0;
  /** Contents held for this run by HOLD (another run had put them), and HOLDs refused. */
  pagesHeld = 0;
  holdsRefused = 0;
  private readonly run: Uint8Array;
  /** The evacuation's keeper id, when the relay is to keep what this run puts for the evacuation's other runs. */
  private readonly keeper: Uint8Array | null;
  private readonly events: RelayLinkEvents;
  private builder: PutBuilder;
  private cids: number[] = [];
  /** HOLDs being batched: built as a PUT that is kept, not sent. */
  private holdBuilder: PutBuilder;
  private holdCids: number[] = [];
  private spare: Uint8Array[] = [];
  private readonly inFlight: InFlight[] = [];
  private nextSeq = 0;
  private ackedSeq = 0;

  constructor(index: number, address: string, conn: PeerConnection, run: Uint8Array, keeper: Uint8Array | null, events: RelayLinkEvents) {
    this.index = index;
    this.address = address;
    this.conn = conn;
    this.run = run;
    this.keeper = keeper;
    this.events = events;
    this.builder = new PutBuilder(this.buffer());
    this.holdBuilder = new PutBuilder(this.buffer());
    conn.onFrame((type, payload) => this.onFrame(type, payload));
    void conn.closed.then((reason) => {
      if (this.lostReason !== null) return;
      if (this.inFlight.length > 0 || this.builder.pages > 0 || this.holdBuilder.pages > 0 || reason || this.events.stillNeeded()) {
        this.lose(`relay ${address}: ${reason?.message ?? "connection closed"}`);
      }
    });
  }

  /**
   * The run counts the relay as gone: the gather lost it (it cannot fetch
   * what it holds), or its connection closed. Closing ours too keeps the
   * two views alike.
   */
  lose(why: string): void {
    if (this.lostReason !== null) return;
    const error = new SgmError("unavailable", why);
    this.lostReason = error.message;
    this.events.onLost(error, this.takeUnplaced());
    this.conn.close();
  }

  /**
   * PUT and HOLD batches sent so far, and those being built, each with the
   * sequence number flush() gives it: a map frame naming their pages waits
   * for them. A connection that closed keeps its batch unsent until the
   * relay counts as lost and the pages go elsewhere.
   */
  get sentSeq(): number {
    return this.nextSeq + (this.builder.pages > 0 ? 1 : 0) + (this.holdBuilder.pages > 0 ? 1 : 0);
  }

  /** PUT batches acknowledged so far. */
  get acked(): number {
    return this.ackedSeq;
  }

  /** Not full, not lost: new pages may rank it by its room. */
  get hasRoom(): boolean {
    return !this.full && this.lostReason === null && this.conn.isOpen;
  }

  /** Can take pages now: has room, and is not too far ahead of its acknowledgements. */
  get accepting(): boolean {
    return this.hasRoom && this.inFlight.length < MAX_IN_FLIGHT;
  }

  /** Content `cid` is on its way here, sent or being batched, not yet acknowledged. */
  hasPending(cid: number): boolean {
    return this.cids.includes(cid) || this.holdCids.includes(cid) || this.inFlight.some((batch) => batch.cids.includes(cid));
  }

  get queuedBytes(): number {
    return this.conn.queuedBytes;
  }

  add(cid: number, digest: Uint8Array, digestAt: number, page: Uint8Array): void {
    this.builder.add(digest, digestAt, page);
    this.cids.push(cid);
    this.pagesPut++;
    if (this.builder.full) this.flush();
  }

  /** Asks the relay to hold, for this run, content another run put there; `page` is kept in case it no longer has it. */
  addHold(cid: number, digest: Uint8Array, digestAt: number, page: Uint8Array): void {
    this.holdBuilder.add(digest, digestAt, page);
    this.holdCids.push(cid);
    if (this.holdBuilder.full) this.flush();
  }

  flush(): void {
    // a relay gone, or the run ending: nothing more goes to it
    if (this.lostReason !== null || !this.conn.isOpen) return;
    if (this.builder.pages > 0) {
      const seq = this.nextSeq++;
      const { payload, buffer } = this.builder.take(this.run, seq, this.buffer());
      this.inFlight.push({ kind: "put", seq, buffer, payload, cids: this.cids });
      this.cids = [];
      this.conn.send(RelayFrame.PUT, payload);
      // right behind its PUT on the same connection: the relay has the pages by then, and keeps them long before a
      // gather could hear of them and release them (if one did first, only that dedup is lost)
      if (this.keeper) this.conn.send(RelayFrame.KEEP, encodeKeepOf(this.keeper, payload));
    }
    if (this.holdBuilder.pages > 0) {
      const seq = this.nextSeq++;
      const { payload, buffer } = this.holdBuilder.take(this.run, seq, this.buffer());
      this.inFlight.push({ kind: "hold", seq, buffer, payload, cids: this.holdCids });
      this.holdCids = [];
      // HOLDs come only from an evacuation's runs, which keep what they put
      if (!this.keeper) throw new SgmError("internal", `relay ${this.address}: a HOLD without the evacuation's keeper`);
      this.conn.send(RelayFrame.HOLD, encodeHoldOf(payload, this.keeper));
    }
  }

  /** Every page not acknowledged, sent or still being batched: the relay is gone, and they must go elsewhere. */
  private takeUnplaced(): Refused[] {
    const batches = this.inFlight.splice(0).map((b) => ({ payload: b.payload, cids: b.cids, wasHold: b.kind === "hold" }));
    if (this.builder.pages > 0) batches.push({ payload: this.builder.take(this.run, 0, this.buffer()).payload, cids: this.cids, wasHold: false });
    if (this.holdBuilder.pages > 0) batches.push({ payload: this.holdBuilder.take(this.run, 0, this.buffer()).payload, cids: this.holdCids, wasHold: true });
    this.cids = [];
    this.holdCids = [];
    const unplaced: Refused[] = [];
    for (const batch of batches) {
      const put = readPut(batch.payload);
      batch.cids.forEach((cid, n) => {
        const d = put.digestAt(n);
        const p = put.pageAt(n);
        unplaced.push({ cid, digest: batch.payload.subarray(d, d + DIGEST_BYTES), page: batch.payload.subarray(p, p + 4096), wasHold: batch.wasHold });
      });
    }
    return unplaced;
  }

  private buffer(): Uint8Array {
    return this.spare.pop() ?? new Uint8Array(PutBuilder.BUFFER_BYTES);
  }

  private onFrame(type: number, payload: Uint8Array): void {
    // counted as gone: what it had not acknowledged is placed elsewhere already
    if (this.lostReason !== null) return;
    if (type === FrameType.CONTROL) {
      const message = decodeControl(payload);
      if (message.t === "relay-full") {
        this.full = true;
        this.events.onFull(message.capacity, message.used);
        return;
      }
      // the answer to the run's last reservation, given back as it ends
      if (message.t === "relay-reserved") return;
      throw new SgmError("data", `relay ${this.address} sent '${message.t}'`);
    }
    if (type !== RelayFrame.ACK) throw new SgmError("data", `relay ${this.address} sent frame type ${type}`);
    const ack = readAck(payload);
    const batch = this.inFlight.shift();
    if (!batch || batch.seq !== ack.seq || ack.refused.length !== batch.cids.length) {
      throw new SgmError("data", `relay ${this.address} acknowledged PUT ${ack.seq} out of order`);
    }
    this.ackedSeq = ack.seq + 1;
    const stored: number[] = [];
    const refused: Refused[] = [];
    const put = readPut(batch.payload);
    const wasHold = batch.kind === "hold";
    batch.cids.forEach((cid, n) => {
      if (!ack.refused[n]) {
        if (wasHold) this.pagesHeld++;
        stored.push(cid);
        return;
      }
      if (wasHold) {
        this.holdsRefused++;
      } else {
        this.full = true;
        this.pagesRefused++;
      }
      const d = put.digestAt(n);
      const p = put.pageAt(n);
      refused.push({ cid, digest: batch.payload.subarray(d, d + DIGEST_BYTES), page: batch.payload.subarray(p, p + 4096), wasHold });
    });
    // refused pages are read (and placed elsewhere) before the buffer is reused
    this.events.onAck(stored, refused, wasHold);
    this.spare.push(batch.buffer);
    // a milestone a test can wait for: from now the run counts on what the relay holds
    const mib = this.pagesStored >> 8;
    this.pagesStored += stored.length;
    if (this.pagesStored >> 8 > mib) trace(`relay ${this.address}: ${this.pagesStored >> 8} MiB acknowledged`);
  }
}
