// The scatter's frames, applied in the order they came, every PAGE_DATA
// page checked against its digest first (all of a frame's before any is
// received, so a bad frame changes nothing): on digest threads when the gather
// has them, since SHA-256 of every page was a fifth of its main thread. A
// frame behind a PAGE_DATA still being checked waits for it (copied: its
// bytes are the connection's once the frame handler returns), so content is
// known here before any page map names it; and none applies while the
// handler holds the frames back, as a paused connection delivers none.

import { DIGEST_BYTES, PAGE_BYTES, copyBytes, digestPages, sameDigest } from "../dedup/digest.ts";
import { type DigestBatch, type DigestPool, KEEP } from "../dedup/digest-pool.ts";
import { SgmError } from "../errors.ts";
import { FrameType, pageDataPages, readPageData } from "../wire/messages.ts";

export interface CheckedFramesHandler {
  /** Any frame but PAGE_DATA, now or once those before it are applied. */
  apply(type: number, payload: Uint8Array): void;
  /** A checked page: its digest at `digestAt` of `digests`, its bytes at `pageAt` of `pages`; both valid during the call only. */
  receive(digests: Uint8Array, digestAt: number, pages: Uint8Array, pageAt: number): void;
  /** Every page of a PAGE_DATA payload of `bytes` was received. */
  tookData(bytes: number): void;
  /** Too many frames wait for their check: stop reading, until resume(). */
  pause(): void;
  resume(): void;
  /** Frames may not be applied now (the handler waits for its destination, relays, memory or rate): proceed() once they may. */
  blocked(): boolean;
  /** A page did not match its digest, a frame failed to apply, or a digest thread failed. */
  fail(err: SgmError): void;
}

type Waiting =
  | {
      kind: "data";
      batch: DigestBatch;
      digests: Uint8Array;
      frameBytes: number;
      checked: boolean;
      applied: boolean;
      /** Checked while frames were held back: the batch is still ours (KEEP), released once applied. */
      kept: boolean;
    }
  | { kind: "other"; type: number; payload: Uint8Array };

/** Frames waiting before reading stops: at most 4 MiB of pages, in 16 batches of 512 KiB. */
const MAX_WAITING = 16;
/** And the other frames' copies: a page map is up to 640 KiB, a VM_BYTES frame 4 MiB. */
const MAX_WAITING_COPIED = 8 * 1024 * 1024;

export class CheckedFrames {
  private readonly pool: DigestPool | null;
  private readonly handler: CheckedFramesHandler;
  private readonly waiting: Waiting[] = [];
  /** The digests of a frame's pages, computed here (no digest threads). */
  private computed = new Uint8Array(0);
  private paused = false;
  /** Bytes of the other frames waiting, copied. */
  private copied = 0;
  private dropped = false;
  private readonly checkedWaiters: Array<() => void> = [];

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
    const { pages, stride, count } = pageDataPages(payload);
    if (this.computed.length < count * DIGEST_BYTES) this.computed = new Uint8Array(count * DIGEST_BYTES);
    digestPages(pages, stride, count, this.computed);
    let n = 0;
    readPageData(payload, (digestAt) => this.check(this.computed, n++ * DIGEST_BYTES, payload, digestAt));
    readPageData(payload, (digestAt, pageAt) => this.handler.receive(payload, digestAt, payload, pageAt));
    this.handler.tookData(payload.length);
  }

  /** The handler holds frames back no more: those waiting apply, as far as their checks are done. */
  proceed(): void {
    if (this.waiting.length > 0) this.applyWaiting();
  }

  /**
   * Resolves once no frame waits for its check: all are applied, or those
   * left are held back (the handler's hold: drop them then), or dropped. A
   * check always ends (done, or the threads fail), so this never hangs.
   */
  whenChecked(): Promise<void> {
    const settled = Promise.withResolvers<void>();
    this.checkedWaiters.push(settled.resolve);
    this.settleIfChecked();
    return settled.promise;
  }

  /** The connection is gone: frames still waiting are never applied. */
  drop(): void {
    this.dropped = true;
    for (const entry of this.waiting) if (entry.kind === "data" && entry.kept) this.pool!.release(entry.batch);
    this.waiting.length = 0;
    this.copied = 0;
    this.settleIfChecked();
  }

  private queue(type: number, payload: Uint8Array): void {
    if (type !== FrameType.PAGE_DATA) {
      this.waiting.push({ kind: "other", type, payload: payload.slice() });
      this.copied += payload.length;
    } else this.queueData(payload);
    if ((this.waiting.length >= MAX_WAITING || this.copied >= MAX_WAITING_COPIED) && !this.paused) {
      this.paused = true;
      this.handler.pause();
    }
  }

  private queueData(payload: Uint8Array): void {
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
    const entry: Waiting & { kind: "data" } = { kind: "data", batch, digests, frameBytes: payload.length, checked: false, applied: false, kept: false };
    this.waiting.push(entry);
    // batches complete in the order they were submitted: this one's callback runs with it at the head
    pool.submit(
      batch,
      () => {
        entry.checked = true;
        this.applyWaiting();
        if (entry.applied || this.dropped) return;
        // held back: its pages stay in the batch, which the pool must not reuse yet
        entry.kept = true;
        return KEEP;
      },
      (err) => this.failWith(err),
    );
  }

  private applyWaiting(): void {
    try {
      while (this.waiting.length > 0 && !this.dropped && !this.handler.blocked()) {
        const head = this.waiting[0]!;
        if (head.kind === "data" && !head.checked) break;
        this.waiting.shift();
        if (head.kind === "other") {
          this.copied -= head.payload.length;
          this.handler.apply(head.type, head.payload);
        }
        else {
          const { batch, digests } = head;
          head.applied = true;
          try {
            for (let k = 0; k < batch.count; k++) this.check(batch.digests, k * DIGEST_BYTES, digests, k * DIGEST_BYTES);
            for (let k = 0; k < batch.count; k++) this.handler.receive(digests, k * DIGEST_BYTES, batch.pages, k * PAGE_BYTES);
          } finally {
            if (head.kept) this.pool!.release(batch);
          }
          this.handler.tookData(head.frameBytes);
        }
      }
    } catch (err) {
      this.failWith(err instanceof SgmError ? err : new SgmError("internal", String((err as Error)?.message ?? err), { cause: err }));
      return;
    }
    if (this.paused && this.waiting.length <= MAX_WAITING / 4 && this.copied <= MAX_WAITING_COPIED / 4) {
      this.paused = false;
      this.handler.resume();
    }
    this.settleIfChecked();
  }

  /** The digest computed at `computedAt` must be the one sent at `at` of `digests`. */
  private check(computed: Uint8Array, computedAt: number, digests: Uint8Array, at: number): void {
    if (!sameDigest(computed, computedAt, digests, at)) throw new SgmError("data", "page content does not match its digest");
  }

  private settleIfChecked(): void {
    if (this.checkedWaiters.length === 0) return;
    if (this.waiting.length > 0 && !this.dropped && !this.handler.blocked()) return;
    for (const resolve of this.checkedWaiters.splice(0)) resolve();
  }

  private failWith(err: SgmError): void {
    this.drop();
    this.handler.fail(err);
  }
}
