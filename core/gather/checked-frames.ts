// The scatter's frames, applied in the order they came, every PAGE_DATA
// page checked against its digest first (all of a frame's before any is
// received, so a bad frame changes nothing): on digest threads when the gather
// has them, since SHA-256 of every page was a fifth of its main thread. A
// frame behind a PAGE_DATA still being checked waits for it (copied: its
// bytes are the connection's once the frame handler returns), so content is
// known here before any page map names it.

import { DIGEST_BYTES, PAGE_BYTES, copyBytes, digestPage } from "../dedup/digest.ts";
import type { DigestBatch, DigestPool } from "../dedup/digest-pool.ts";
import { SgmError } from "../errors.ts";
import { FrameType, readPageData } from "../wire/messages.ts";

export interface CheckedFramesHandler {
  /** Any frame but PAGE_DATA, now or once those before it are applied. */
  apply(type: number, payload: Uint8Array): void;
  /** A checked page: its digest at `digestAt` of `digests`, its bytes `page`; both valid during the call only. */
  receive(digests: Uint8Array, digestAt: number, page: Uint8Array): void;
  /** Every page of a PAGE_DATA payload of `bytes` was received. */
  tookData(bytes: number): void;
  /** Too many frames wait for their check: stop reading, until resume(). */
  pause(): void;
  resume(): void;
  /** A page did not match its digest, a frame failed to apply, or a digest thread failed. */
  fail(err: SgmError): void;
}

type Waiting =
  | { kind: "data"; batch: DigestBatch; digests: Uint8Array; frameBytes: number; checked: boolean }
  | { kind: "other"; type: number; payload: Uint8Array };

/** PAGE_DATA frames (64 pages at most) waiting for their check before reading stops: 4 MiB of pages. */
const MAX_WAITING = 16;

export class CheckedFrames {
  private readonly pool: DigestPool | null;
  private readonly handler: CheckedFramesHandler;
  private readonly waiting: Waiting[] = [];
  private readonly digest = new Uint8Array(DIGEST_BYTES);
  private paused = false;
  private dropped = false;
  /** Why frames were dropped, when a check or an apply failed here. */
  failure: SgmError | null = null;
  private idleWaiters: Array<() => void> = [];

  constructor(pool: DigestPool | null, handler: CheckedFramesHandler) {
    this.pool = pool;
    this.handler = handler;
  }

  /** Applies the frame, or queues it behind frames being checked. Throws what applying it threw. */
  take(type: number, payload: Uint8Array): void {
    if (this.dropped) return;
    if (this.pool && (type === FrameType.PAGE_DATA || this.waiting.length > 0)) {
      this.queue(type, payload);
      return;
    }
    if (type !== FrameType.PAGE_DATA) {
      this.handler.apply(type, payload);
      return;
    }
    // no digest threads: checked here, straight from the frame, every page before any is received
    readPageData(payload, (digestAt, pageAt) => {
      digestPage(payload.subarray(pageAt, pageAt + PAGE_BYTES), this.digest);
      this.check(payload, digestAt);
    });
    readPageData(payload, (digestAt, pageAt) => this.handler.receive(payload, digestAt, payload.subarray(pageAt, pageAt + PAGE_BYTES)));
    this.handler.tookData(payload.length);
  }

  /** Resolves once no frame waits (at once if none does), or when they are dropped. */
  whenIdle(): Promise<void> {
    if (this.waiting.length === 0 || this.dropped) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** The connection failed: frames still waiting are never applied. */
  drop(): void {
    this.dropped = true;
    this.waiting.length = 0;
    this.wakeIdle();
  }

  /** Frames waiting for their check, or behind one. */
  get waitingFrames(): number {
    return this.waiting.length;
  }

  private queue(type: number, payload: Uint8Array): void {
    if (type !== FrameType.PAGE_DATA) {
      this.waiting.push({ kind: "other", type, payload: payload.slice() });
      return;
    }
    const pool = this.pool!;
    const batch = pool.acquire();
    let count = 0;
    readPageData(payload, () => count++);
    const digests = new Uint8Array(count * DIGEST_BYTES);
    let n = 0;
    readPageData(payload, (digestAt, pageAt) => {
      copyBytes(payload, pageAt, batch.pages, n * PAGE_BYTES, PAGE_BYTES);
      copyBytes(payload, digestAt, digests, n * DIGEST_BYTES, DIGEST_BYTES);
      n++;
    });
    batch.count = count;
    const entry: Waiting = { kind: "data", batch, digests, frameBytes: payload.length, checked: false };
    this.waiting.push(entry);
    // batches complete in the order they were submitted: this one's callback runs with it at the head
    pool.submit(
      batch,
      () => {
        entry.checked = true;
        this.applyWaiting();
      },
      (err) => this.failWith(err),
    );
    if (this.waiting.length >= MAX_WAITING && !this.paused) {
      this.paused = true;
      this.handler.pause();
    }
  }

  private applyWaiting(): void {
    try {
      while (this.waiting.length > 0 && !this.dropped) {
        const head = this.waiting[0]!;
        if (head.kind === "data" && !head.checked) break;
        this.waiting.shift();
        if (head.kind === "other") this.handler.apply(head.type, head.payload);
        else {
          const { batch, digests } = head;
          for (let k = 0; k < batch.count; k++) {
            copyBytes(batch.digests, k * DIGEST_BYTES, this.digest, 0, DIGEST_BYTES);
            this.check(digests, k * DIGEST_BYTES);
          }
          for (let k = 0; k < batch.count; k++) this.handler.receive(digests, k * DIGEST_BYTES, batch.pages.subarray(k * PAGE_BYTES, (k + 1) * PAGE_BYTES));
          this.handler.tookData(head.frameBytes);
        }
      }
    } catch (err) {
      this.failWith(err instanceof SgmError ? err : new SgmError("internal", String((err as Error)?.message ?? err), { cause: err }));
      return;
    }
    if (this.paused && this.waiting.length <= MAX_WAITING / 4) {
      this.paused = false;
      this.handler.resume();
    }
    if (this.waiting.length === 0) this.wakeIdle();
  }

  /** The digest just computed (this.digest) must be the one at `at` of `digests`. */
  private check(digests: Uint8Array, at: number): void {
    for (let i = 0; i < DIGEST_BYTES; i++) {
      if (this.digest[i] !== digests[at + i]) throw new SgmError("data", "page content does not match its digest");
    }
  }

  private failWith(err: SgmError): void {
    this.failure ??= err;
    this.drop();
    this.handler.fail(err);
  }

  private wakeIdle(): void {
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const wake of waiters) wake();
  }
}
