// With digest threads where the native digest does not run (where it does,
// hash helpers split each chunk's pages with the reader instead: see
// dedup/hash-threads.ts), a VM's page records wait in batches while
// their pages are hashed, and reach the pipeline in exactly the order the
// source sent them: a zero page, a discard or a map flush that follows a page
// still being hashed waits behind it. When nothing waits, records that
// need no digest go straight through.

import { isZeroPage, DIGEST_BYTES, PAGE_BYTES, digestPage } from "../dedup/digest.ts";
import { BATCH_PAGES, type DigestBatch, type DigestPool } from "../dedup/digest-pool.ts";
import { asSgmError, type SgmError } from "../errors.ts";

/** What the records become, in order; a digest is at digests[at .. at + 32). */
export interface RecordSink {
  page(block: number, page: number, digests: Uint8Array, at: number, content: Uint8Array): void;
  zero(block: number, page: number): void;
  pending(block: number, page: number): void;
  urgent(block: number, page: number, digests: Uint8Array | null, at: number, content: Uint8Array | null): void;
  flush(): void;
}

const PAGE = 0;
const ZERO = 1;
const PENDING = 2;
const URGENT = 3;
const FLUSH = 4;

/** Records per batch, counting those without a page (zero pages, discards). */
const MAX_RECORDS = 4096;
/** Batches submitted and not yet applied before the source should be read no further. */
export const MAX_OUTSTANDING = 8;

interface Batch {
  digests: DigestBatch;
  kinds: Uint8Array;
  blocks: Int32Array;
  pages: Int32Array;
  /** The page's place in digests.pages, or -1. */
  slots: Int32Array;
  records: number;
}

export class PageBatches {
  private readonly pool: DigestPool;
  private readonly sink: RecordSink;
  private readonly onError: (err: SgmError) => void;
  private open: Batch | null = null;
  private readonly spare: Batch[] = [];
  private outstanding = 0;
  private submitScheduled = false;
  private failed = false;
  private idleWaiters: Array<() => void> = [];
  private roomWaiters: Array<() => void> = [];
  private readonly scratch = new Uint8Array(DIGEST_BYTES);

  constructor(pool: DigestPool, sink: RecordSink, onError: (err: SgmError) => void) {
    this.pool = pool;
    this.sink = sink;
    this.onError = onError;
  }

  /** No record waits: the next ones that need no digest go straight through. */
  get idle(): boolean {
    return this.open === null && this.outstanding === 0;
  }

  /** Enough is waiting for digests that the source should be read no further for now. */
  get backlogged(): boolean {
    return this.outstanding >= MAX_OUTSTANDING;
  }

  whenIdle(): Promise<void> {
    this.submit();
    if (this.idle) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  whenRoom(): Promise<void> {
    if (!this.backlogged) return Promise.resolve();
    return new Promise((resolve) => this.roomWaiters.push(resolve));
  }

  page(block: number, page: number, content: Uint8Array | null): void {
    if (content === null || isZeroPage(content)) {
      this.zero(block, page);
      return;
    }
    const batch = this.openBatch();
    const slot = batch.digests.count++;
    batch.digests.pages.set(content, slot * PAGE_BYTES);
    this.add(batch, PAGE, block, page, slot);
  }

  zero(block: number, page: number): void {
    if (this.idle) this.sink.zero(block, page);
    else this.add(this.openBatch(), ZERO, block, page, -1);
  }

  pending(block: number, page: number): void {
    if (this.idle) this.sink.pending(block, page);
    else this.add(this.openBatch(), PENDING, block, page, -1);
  }

  /** A page the destination waits for: hashed here when nothing waits, else next in line and submitted at once. */
  urgent(block: number, page: number, content: Uint8Array | null): void {
    const zero = content === null || isZeroPage(content);
    if (this.idle) {
      if (!zero) digestPage(content!, this.scratch);
      this.sink.urgent(block, page, zero ? null : this.scratch, 0, zero ? null : content);
      return;
    }
    const batch = this.openBatch();
    let slot = -1;
    if (!zero) {
      slot = batch.digests.count++;
      batch.digests.pages.set(content!, slot * PAGE_BYTES);
    }
    this.add(batch, URGENT, block, page, slot);
    this.submit();
  }

  /** Ends the current map frame once every record before it is applied. */
  flush(): void {
    if (this.idle) {
      this.sink.flush();
      return;
    }
    this.add(this.openBatch(), FLUSH, 0, 0, -1);
    this.submit();
  }

  /** Applies nothing more: the eviction is over. */
  stop(): void {
    this.failed = true;
    this.open = null;
  }

  private openBatch(): Batch {
    if (this.open) return this.open;
    const digests = this.pool.acquire();
    const batch = this.spare.pop() ?? {
      digests,
      kinds: new Uint8Array(MAX_RECORDS),
      blocks: new Int32Array(MAX_RECORDS),
      pages: new Int32Array(MAX_RECORDS),
      slots: new Int32Array(MAX_RECORDS),
      records: 0,
    };
    batch.digests = digests;
    batch.records = 0;
    this.open = batch;
    if (!this.submitScheduled) {
      this.submitScheduled = true;
      // what one turn of the event loop read goes out together, whatever its size
      setImmediate(() => {
        this.submitScheduled = false;
        this.submit();
      });
    }
    return batch;
  }

  private add(batch: Batch, kind: number, block: number, page: number, slot: number): void {
    const r = batch.records++;
    batch.kinds[r] = kind;
    batch.blocks[r] = block;
    batch.pages[r] = page;
    batch.slots[r] = slot;
    if (batch.records === MAX_RECORDS || batch.digests.count === BATCH_PAGES) this.submit();
  }

  private submit(): void {
    const batch = this.open;
    if (!batch || this.failed) return;
    this.open = null;
    this.outstanding++;
    try {
      this.pool.submit(batch.digests, () => this.apply(batch), (err) => this.fail(err));
    } catch (err) {
      this.fail(asSgmError(err));
    }
  }

  private apply(batch: Batch): void {
    this.outstanding--;
    if (this.failed) return;
    const { pages, digests } = batch.digests;
    try {
      for (let r = 0; r < batch.records; r++) {
        const block = batch.blocks[r]!;
        const page = batch.pages[r]!;
        const slot = batch.slots[r]!;
        switch (batch.kinds[r]) {
          case PAGE:
            this.sink.page(block, page, digests, slot * DIGEST_BYTES, pages.subarray(slot * PAGE_BYTES, (slot + 1) * PAGE_BYTES));
            break;
          case ZERO:
            this.sink.zero(block, page);
            break;
          case PENDING:
            this.sink.pending(block, page);
            break;
          case URGENT:
            if (slot < 0) this.sink.urgent(block, page, null, 0, null);
            else this.sink.urgent(block, page, digests, slot * DIGEST_BYTES, pages.subarray(slot * PAGE_BYTES, (slot + 1) * PAGE_BYTES));
            break;
          case FLUSH:
            this.sink.flush();
            break;
        }
      }
    } catch (err) {
      this.fail(asSgmError(err));
      return;
    }
    this.spare.push(batch);
    if (!this.backlogged) for (const wake of this.roomWaiters.splice(0)) wake();
    if (this.idle) for (const wake of this.idleWaiters.splice(0)) wake();
  }

  private fail(err: SgmError): void {
    if (this.failed) return;
    this.failed = true;
    this.onError(err);
  }
}
