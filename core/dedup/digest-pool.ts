// Page digests on worker threads, for the role whose one thread must keep
// up with a source QEMU: SHA-256 of every page was 40% of the scatter's
// CPU, and one core hashes ~1.6 GB/s at best a page at a time (~3 GB/s a
// batch at a time, as each thread does: digest.ts digestPages). Pages are
// copied into a batch in shared memory, hashed by the next worker, and the
// batches come back in the order they were submitted, whichever worker
// finishes first.
//
// A batch is the caller's until it is submitted and again inside its
// callback; after the callback it is reused for a later batch, unless the
// callback returns KEEP: then it stays the caller's until release().

import { availableParallelism } from "node:os";
import { SgmError } from "../errors.ts";
import { DIGEST_BYTES, PAGE_BYTES } from "./digest.ts";
import { BATCH_PAGES, type DigestBatchMemory, jobMessage } from "./digest-job.ts";

export { BATCH_PAGES };

/**
 * Digest threads for a host with `cores`: one core is left to the thread
 * that reads the sources and one to the source QEMUs' migration threads;
 * up to 4 of the rest hash (together ~6 GB/s, more than a 25 Gbit/s link).
 * On 2 cores, none: a thread's hand-offs cost more than they free.
 */
export function defaultDigestThreads(cores = availableParallelism()): number {
  return Math.max(0, Math.min(4, cores - 2));
}

export interface DigestBatch {
  readonly id: number;
  /** Room for BATCH_PAGES pages; the first `count` are hashed. */
  readonly pages: Uint8Array;
  /** Page n's digest at n * 32, once the batch is done. */
  readonly digests: Uint8Array;
  count: number;
}

/** From a batch's callback: the caller still reads the batch, and gives it back with release(). */
export const KEEP = Symbol("keep the batch");

type OnDone = (batch: DigestBatch) => void | typeof KEEP;

interface Submitted {
  batch: DigestBatch;
  done: boolean;
  onDone: OnDone;
  onError: (err: SgmError) => void;
}

export class DigestPool {
  private readonly workers: Worker[];
  private readonly batches: DigestBatch[] = [];
  private readonly free: DigestBatch[] = [];
  /** Batches whose callback returned KEEP, until release(). */
  private readonly kept = new Set<DigestBatch>();
  private readonly inFlight: Submitted[] = [];
  private readonly byId = new Map<number, Submitted>();
  private next = 0;
  private failure: SgmError | null = null;

  constructor(threads: number) {
    if (!(Number.isInteger(threads) && threads > 0)) throw new SgmError("internal", `digest pool of ${threads} threads`);
    // compiled, every module is at its source path under the executable's
    // own root (the Makefile builds the worker as a second entry point)
    const url = import.meta.url.startsWith("file:///$bunfs/") ? "./core/dedup/digest-worker.ts" : new URL("./digest-worker.ts", import.meta.url).href;
    this.workers = Array.from({ length: threads }, () => {
      const worker = new Worker(url);
      worker.onmessage = (event: MessageEvent<number>) => this.done(event.data);
      worker.onerror = (event) => this.fail(new SgmError("internal", `digest thread failed: ${event.message}`));
      return worker;
    });
  }

  get threads(): number {
    return this.workers.length;
  }

  /** Batches submitted whose callbacks have not run yet. */
  get outstanding(): number {
    return this.inFlight.length;
  }

  /** An empty batch; a new one when every batch is in flight (the caller bounds how many it keeps out). */
  acquire(): DigestBatch {
    const batch = this.free.pop() ?? this.allocate();
    batch.count = 0;
    return batch;
  }

  /**
   * Hashes the batch's pages; `onDone` runs after those of every batch
   * submitted before it. If a thread fails, every batch in flight gets
   * `onError` instead, and no batch completes after that.
   */
  submit(batch: DigestBatch, onDone: OnDone, onError: (err: SgmError) => void): void {
    if (this.failure) throw this.failure;
    const entry: Submitted = { batch, done: false, onDone, onError };
    this.inFlight.push(entry);
    this.byId.set(batch.id, entry);
    this.workers[this.next]!.postMessage(jobMessage(batch.id, batch.count));
    this.next = (this.next + 1) % this.workers.length;
  }

  /** A batch kept from its callback (KEEP) may be reused. */
  release(batch: DigestBatch): void {
    // released twice, one batch would be two callers' at once: pages overwritten under one of them
    if (!this.kept.delete(batch)) throw new SgmError("internal", `digest batch ${batch.id} released but not kept`);
    this.free.push(batch);
  }

  close(): void {
    for (const worker of this.workers) worker.terminate();
  }

  private allocate(): DigestBatch {
    const batch: DigestBatch = {
      id: this.batches.length,
      pages: new Uint8Array(new SharedArrayBuffer(BATCH_PAGES * PAGE_BYTES)),
      digests: new Uint8Array(new SharedArrayBuffer(BATCH_PAGES * DIGEST_BYTES)),
      count: 0,
    };
    this.batches.push(batch);
    // every thread learns the batch's memory once; each job then names it by
    // id, a number, where cloning the two shared views cost ~45 us a job
    const registration: DigestBatchMemory = { id: batch.id, pages: batch.pages, digests: batch.digests };
    for (const worker of this.workers) worker.postMessage(registration);
    return batch;
  }

  private done(id: number): void {
    const entry = this.byId.get(id);
    if (!entry || this.failure) return;
    entry.done = true;
    while (this.inFlight.length > 0 && this.inFlight[0]!.done) {
      const head = this.inFlight.shift()!;
      this.byId.delete(head.batch.id);
      if (head.onDone(head.batch) === KEEP) this.kept.add(head.batch);
      else this.free.push(head.batch);
    }
  }

  private fail(err: SgmError): void {
    if (this.failure) return;
    this.failure = err;
    for (const entry of this.inFlight.splice(0)) entry.onError(err);
    this.byId.clear();
  }
}
