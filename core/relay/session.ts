// One client of a relay (a scatter putting pages, a gather getting and
// releasing them): its frames, applied in order to the shared store, each
// answered on the same connection. Any authenticated peer may send any
// relay request; the run id, not the connection, says whose pages they are.

import { Buffer } from "node:buffer";
import { DIGEST_BYTES, PAGE_BYTES, copyBytes, digestPages, sameDigest } from "../dedup/digest.ts";
import type { DigestBatch, DigestPool } from "../dedup/digest-pool.ts";
import type { PageStore } from "../dedup/page-store.ts";
import { SgmError, asSgmError } from "../errors.ts";
import type { PeerConnection } from "../wire/connection.ts";
import { decodeControl, encodeControl } from "../wire/control.ts";
import { FrameType } from "../wire/messages.ts";
import {
  GET_BATCH,
  PUT_BATCH,
  PUT_ENTRY,
  PagesBuilder,
  RelayFrame,
  encodeAck,
  encodeHasReply,
  readDigestRequest,
  readHold,
  readKeep,
  readPut,
  readRelease,
} from "../wire/relay-messages.ts";
import { RecycledBuffers } from "../net/recycled-buffers.ts";
import type { RateLimiter } from "../net/rate-limiter.ts";
import { encodeProbeAck, ProbeFrame } from "../wire/probe-frames.ts";
import type { RunHolds } from "./holds.ts";

// A client that sends requests but does not read the replies would make us
// queue them without end: above PAUSE_ABOVE bytes queued we stop reading its
// requests, and go on once the queue is down to RESUME_AT.
export const PAUSE_ABOVE = 4 << 20;
export const RESUME_AT = 1 << 20;

export interface RelayCounters {
  /** Page bytes of PUT entries the relay accepted. */
  bytesIn: number;
  /** Page bytes sent in PAGES replies. */
  bytesOut: number;
  /** PUT entries refused because the store was full. */
  refusedPages: number;
}

/** What every session of one relay shares. */
export interface RelayShared {
  /** Threads that check PUT pages against their digests; null to check them on this one. */
  readonly digestPool: DigestPool | null;
  readonly store: PageStore;
  readonly holds: RunHolds;
  readonly counters: RelayCounters;
  /** The relay's --max-rate over everything its clients send it, or null. */
  readonly limiter: RateLimiter | null;
  /** Monotonic milliseconds, for run deadlines. */
  now(): number;
}

const FRAME_NAMES = new Map<number, string>(
  [...Object.entries(FrameType), ...Object.entries(RelayFrame), ...Object.entries(ProbeFrame)].map(([name, type]) => [type, name]),
);

/**
 * A request waiting while a PUT before it is checked on a digest thread:
 * requests are answered in the order they came.
 */
type Waiting =
  | { kind: "put"; put: CheckedPut; checked: boolean }
  | { kind: "other"; type: number; payload: Uint8Array };

/** A PUT copied out of its frame for the digest threads: its pages in the batch, its digests beside. */
interface CheckedPut {
  run: Uint8Array;
  seq: number;
  count: number;
  digests: Uint8Array;
  batch: DigestBatch;
}

/** PUTs a client may have waiting for their check before the relay stops reading it. */
const MAX_WAITING = 32;

export class RelaySession {
  private readonly conn: PeerConnection;
  private readonly shared: RelayShared;
  /** The digests of a PUT's pages, computed here (no digest threads). */
  private readonly computed = new Uint8Array(PUT_BATCH * DIGEST_BYTES);
  private fullSent = false;
  /** Why reading this client's requests is paused: its replies queue up, the relay's rate is spent, or PUTs wait for their check. */
  private readonly pausedFor = new Set<"replies" | "rate" | "checks">();
  private readonly waiting: Waiting[] = [];
  private readonly replyBuffers: RecycledBuffers;

  constructor(conn: PeerConnection, shared: RelayShared) {
    this.conn = conn;
    this.shared = shared;
    this.replyBuffers = new RecycledBuffers(PagesBuilder.bytesFor(GET_BATCH), () => conn.bytesSent);
    // A throw from here is a data error: the connection drops this peer alone.
    conn.onFrame((type, payload) => this.onFrame(type, payload));
  }

  private onFrame(type: number, payload: Uint8Array): void {
    if (this.shared.digestPool && (type === RelayFrame.PUT || this.waiting.length > 0)) {
      this.wait(type, payload);
      this.throttleRate(payload.length);
      return;
    }
    this.apply(type, payload);
    this.throttleRate(payload.length);
  }

  private apply(type: number, payload: Uint8Array): void {
    switch (type) {
      case RelayFrame.PUT:
        this.put(payload);
        break;
      case RelayFrame.GET:
        this.get(payload);
        break;
      case RelayFrame.HAS:
        this.has(payload);
        break;
      case RelayFrame.HOLD:
        this.hold(payload);
        break;
      case RelayFrame.KEEP:
        this.keep(payload);
        break;
      case RelayFrame.RELEASE:
        this.release(payload);
        break;
      case FrameType.CONTROL:
        this.control(payload);
        break;
      case ProbeFrame.PROBE:
        this.conn.send(ProbeFrame.PROBE_ACK, encodeProbeAck(payload));
        break;
      default:
        throw new SgmError("data", `frame type ${type} (${FRAME_NAMES.get(type) ?? "unknown"}) is not a relay request`);
    }
    this.throttleReplies();
  }

  /** A PUT goes to the digest threads, and what follows it waits for it. */
  private wait(type: number, payload: Uint8Array): void {
    if (type !== RelayFrame.PUT) {
      // the frame's bytes are the connection's once this call returns
      this.waiting.push({ kind: "other", type, payload: payload.slice() });
    } else {
      const put = readPut(payload);
      const batch = this.shared.digestPool!.acquire();
      const digests = new Uint8Array(put.count * DIGEST_BYTES);
      for (let n = 0; n < put.count; n++) {
        copyBytes(payload, put.pageAt(n), batch.pages, n * PAGE_BYTES, PAGE_BYTES);
        copyBytes(payload, put.digestAt(n), digests, n * DIGEST_BYTES, DIGEST_BYTES);
      }
      batch.count = put.count;
      const entry: Waiting = { kind: "put", put: { run: put.run.slice(), seq: put.seq, count: put.count, digests, batch }, checked: false };
      this.waiting.push(entry);
      // batches complete in the order they were submitted: this one's callback runs with it at the head
      this.shared.digestPool!.submit(
        batch,
        () => {
          entry.checked = true;
          this.applyWaiting();
        },
        (err) => this.conn.abort(err),
      );
    }
    if (this.waiting.length >= MAX_WAITING) this.pause("checks");
  }

  private applyWaiting(): void {
    try {
      while (this.waiting.length > 0) {
        const head = this.waiting[0]!;
        if (head.kind === "put" && !head.checked) break;
        this.waiting.shift();
        if (!this.conn.isOpen) continue; // gone: nothing to answer, nothing to keep
        if (head.kind === "other") this.apply(head.type, head.payload);
        else {
          const { run, seq, count, digests, batch } = head.put;
          this.checkDigests(seq, count, digests, (n) => n * DIGEST_BYTES, batch.digests);
          this.store(run, seq, count, digests, (n) => n * DIGEST_BYTES, batch.pages, (n) => n * PAGE_BYTES);
          this.throttleReplies();
        }
      }
    } catch (err) {
      this.waiting.length = 0;
      this.conn.abort(new SgmError("data", `${this.conn.remoteAddress}: ${asSgmError(err).message}`));
      return;
    }
    if (this.waiting.length < MAX_WAITING / 4) this.resume("checks");
  }

  private put(payload: Uint8Array): void {
    const put = readPut(payload);
    // the pages lie one entry apart: hashed in one call, straight from the frame
    digestPages(payload.subarray(put.pageAt(0)), PUT_ENTRY, put.count, this.computed);
    this.checkDigests(put.seq, put.count, payload, put.digestAt, this.computed);
    this.store(put.run, put.seq, put.count, payload, put.digestAt, payload, put.pageAt);
  }

  /** All pages are checked before any is stored, so a bad frame changes nothing; page n's digest is computed[32 n ..]. */
  private checkDigests(seq: number, count: number, digests: Uint8Array, digestAt: (n: number) => number, computed: Uint8Array): void {
    for (let n = 0; n < count; n++) {
      if (!sameDigest(computed, n * DIGEST_BYTES, digests, digestAt(n))) {
        throw new SgmError("data", `relay PUT ${seq}: page ${n} does not match its digest`);
      }
    }
  }

  private store(
    runId: Uint8Array,
    seq: number,
    count: number,
    digests: Uint8Array,
    digestAt: (n: number) => number,
    pages: Uint8Array,
    pageAt: (n: number) => number,
  ): void {
    const { holds, counters } = this.shared;
    const refused = holds.holdPut(runKey(runId), count, digests, digestAt, pages, pageAt, this.shared.now());
    let anyRefused = false;
    for (const no of refused) {
      if (no) {
        counters.refusedPages++;
        anyRefused = true;
      } else counters.bytesIn += PAGE_BYTES;
    }
    if (anyRefused && !this.fullSent) {
      // Once per connection: the client learns why from the first refusal, then reads the ACK bitmaps.
      this.fullSent = true;
      const { store } = this.shared;
      this.conn.send(FrameType.CONTROL, encodeControl({ t: "relay-full", capacity: store.capacityBytes, used: store.usedBytes }));
    }
    this.conn.send(RelayFrame.ACK, encodeAck(seq, refused));
  }

  private get(payload: Uint8Array): void {
    const { run, req, count, digests } = readDigestRequest(payload, "GET");
    const { store, holds, counters } = this.shared;
    const key = runKey(run);
    // a buffer whose earlier reply has been written: fresh memory costs page faults
    const buffer = this.replyBuffers.acquire();
    const reply = new PagesBuilder(req, count, buffer);
    for (let n = 0; n < count; n++) {
      const id = store.idOf(digests, n * DIGEST_BYTES);
      // only what the run holds: another run's page, or a spare one, is not there for it
      const found = id !== -1 && holds.holds(key, id);
      const pageAt = reply.addEntry(digests, n * DIGEST_BYTES, found);
      if (!found) continue;
      store.copyOut(id, buffer, pageAt);
      counters.bytesOut += PAGE_BYTES;
    }
    // the connection keeps the buffer until written; it is used again after that
    this.conn.send(RelayFrame.PAGES, reply.take());
    this.replyBuffers.queued(buffer, this.conn.bytesAccepted);
  }

  private has(payload: Uint8Array): void {
    const { run, req, count, digests } = readDigestRequest(payload, "HAS");
    const { store, holds } = this.shared;
    const key = runKey(run);
    const held: boolean[] = [];
    for (let n = 0; n < count; n++) {
      const id = store.idOf(digests, n * DIGEST_BYTES);
      held.push(id !== -1 && holds.holds(key, id));
    }
    this.conn.send(RelayFrame.HAS_REPLY, encodeHasReply(req, held));
  }

  /** Holds for the run what the keeper keeps of these digests; what it does not, the run must put. */
  private hold(payload: Uint8Array): void {
    const { run, keeper, seq, count, digests } = readHold(payload);
    const key = runKey(run);
    const keeperKey = runKey(keeper);
    const now = this.shared.now();
    const refused: boolean[] = [];
    for (let n = 0; n < count; n++) refused.push(!this.shared.holds.holdHeld(key, keeperKey, digests, n * DIGEST_BYTES, now));
    this.conn.send(RelayFrame.ACK, encodeAck(seq, refused));
  }

  private keep(payload: Uint8Array): void {
    const { keeper, run, count, digests } = readKeep(payload);
    const key = runKey(keeper);
    const runHex = runKey(run);
    const now = this.shared.now();
    for (let n = 0; n < count; n++) this.shared.holds.keep(key, runHex, digests, n * DIGEST_BYTES, now);
  }

  private release(payload: Uint8Array): void {
    const { run, count, digests } = readRelease(payload);
    this.shared.holds.release(runKey(run), digests, count, this.shared.now());
  }

  private control(payload: Uint8Array): void {
    const message = decodeControl(payload);
    const { store, holds, counters, limiter } = this.shared;
    if (message.t === "relay-unkeep") {
      const pages = holds.unkeepAll(message.run);
      this.conn.send(FrameType.CONTROL, encodeControl({ t: "relay-unkept", run: message.run, pages }));
      return;
    }
    if (message.t === "relay-reserve") {
      const bytes = holds.reserve(message.run, message.bytes, this.shared.now());
      this.conn.send(FrameType.CONTROL, encodeControl({ t: "relay-reserved", run: message.run, bytes }));
      return;
    }
    if (message.t !== "relay-stats?") throw new SgmError("data", `control message '${message.t}' is not a relay request`);
    this.conn.send(
      FrameType.CONTROL,
      encodeControl({
        t: "relay-stats",
        capacity: store.capacityBytes,
        used: store.usedBytes,
        free: holds.roomFor(message.run),
        reserved: holds.outstandingBytes,
        pages: store.pages,
        bytesIn: counters.bytesIn,
        bytesOut: counters.bytesOut,
        runs: holds.runCount,
        maxRate: limiter?.bytesPerSecond ?? null,
      }),
    );
  }

  private throttleReplies(): void {
    if (this.pausedFor.has("replies") || this.conn.queuedBytes <= PAUSE_ABOVE) return;
    this.pause("replies");
    this.conn.whenWritable(RESUME_AT).then(
      () => this.resume("replies"),
      () => {}, // closed while paused: nothing left to resume
    );
  }

  /** Holds this client to the relay's --max-rate: reading waits while the bucket is in debt. */
  private throttleRate(bytes: number): void {
    const limiter = this.shared.limiter;
    if (!limiter) return;
    limiter.take(bytes);
    const wait = limiter.waitMs();
    if (wait <= 0 || this.pausedFor.has("rate")) return;
    this.pause("rate");
    setTimeout(() => this.resume("rate"), wait);
  }

  private pause(reason: "replies" | "rate" | "checks"): void {
    if (this.pausedFor.size === 0) this.conn.pauseReading();
    this.pausedFor.add(reason);
  }

  private resume(reason: "replies" | "rate" | "checks"): void {
    if (!this.pausedFor.delete(reason) || this.pausedFor.size > 0) return;
    this.conn.resumeReading();
  }
}

/** A run id as a map key. */
function runKey(run: Uint8Array): string {
  return Buffer.from(run.buffer, run.byteOffset, run.length).toString("hex");
}

