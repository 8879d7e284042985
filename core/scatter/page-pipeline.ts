// One VM's pages on their way out: each non-zero page is hashed and placed
// (see placement.ts); every page's (block, page) -> digest or zero record
// goes to the gather in PAGE_MAP frames, in the order the source sent them,
// so the gather always ends with the latest version of every page.
//
// A map frame leaves only once every relay PUT sent before it is
// acknowledged: the gather never learns of a page before its content is
// held somewhere.
//
// It also keeps the final page map as the source sent it (content id per
// page), whose digest the gather's must match before the VM may run there.

import { DIGEST_BYTES, digestPage, isZeroPage } from "../dedup/digest.ts";
import type { DigestPool } from "../dedup/digest-pool.ts";
import { pageMapDigest } from "../dedup/page-map-digest.ts";
import { SgmError } from "../errors.ts";
import { RecycledBuffers } from "../net/recycled-buffers.ts";
import { TPS } from "../qemu/constants.ts";
import type { RamBlockInfo } from "../qemu/stream-reader.ts";
import { dumpFinalMap, injected } from "../test-faults.ts";
import { FrameType, PageMapBuilder } from "../wire/messages.ts";
import type { MapProgress } from "./gather-pins.ts";
import { PageBatches, type RecordSink } from "./page-batches.ts";
import { PageRun } from "./page-run.ts";
import type { RunPlacement } from "./placement.ts";

export interface PipelineStats {
  /** Pages a postcopy source discarded (it sends them again). */
  pendingPages: number;
  /** Pages the destination asked for that went ahead of the rest. */
  urgentPages: number;
  /** Page records read from the source, zero or not, counting re-sent pages. */
  pages: number;
  zeroPages: number;
  /** Pages whose content was new to the run (placed once). */
  newPages: number;
  /** Pages sent as a reference to content already placed. */
  dedupPages: number;
  mapBytes: number;
}

/** Final map entries that are no content id. */
const ZERO = -1;
const NEVER_SENT = -2;
const PENDING = -3;

interface PendingFrame {
  payload: Uint8Array;
  buffer: Uint8Array;
  marks: number[];
  entries: number;
}

/**
 * With a digest pool, every record goes through PageBatches in the order
 * it came and reaches the methods of `applied` (the same steps, digest
 * given); without one, the pages lying in the chunk being read wait in a
 * PageRun, hashed together, and every other record settles the run first.
 */
export class PagePipeline {
  readonly stats: PipelineStats = { pendingPages: 0, urgentPages: 0, pages: 0, zeroPages: 0, newPages: 0, dedupPages: 0, mapBytes: 0 };
  private readonly vm: number;
  private readonly placement: RunPlacement;
  private readonly mapBuffers: RecycledBuffers;
  private readonly map: PageMapBuilder;
  private readonly fifo: PendingFrame[] = [];
  private drained: Array<() => void> = [];
  private readonly offAcked: () => void;
  private readonly progress: MapProgress;
  private blockStart: number[] = [];
  private blocks: Array<{ name: string; pages: number }> = [];
  /** Per page (global index over the blocks): its content id, or ZERO, NEVER_SENT, PENDING. */
  private final = new Int32Array(0);
  private readonly batches: PageBatches | null;
  private readonly run: PageRun | null;
  private onError: (err: SgmError) => void = () => {};
  private readonly scratch = new Uint8Array(DIGEST_BYTES);

  constructor(vm: number, placement: RunPlacement, pool: DigestPool | null = null) {
    this.vm = vm;
    this.placement = placement;
    this.batches = pool ? new PageBatches(pool, this.applied, (err) => this.onError(err)) : null;
    this.run = pool ? null : new PageRun();
    const gather = placement.gather;
    this.mapBuffers = new RecycledBuffers(PageMapBuilder.BUFFER_BYTES, () => gather.bytesSent);
    this.map = new PageMapBuilder(() => this.mapBuffers.acquire());
    this.progress = placement.mapStream();
    this.offAcked = placement.onAcked((replaced) => {
      if (replaced) this.raiseMarks();
      this.release();
    });
  }

  /**
   * The source's RAM blocks, before any page. A source that streams again
   * names the same ones (source-attempt.ts checks that first), and the map
   * so far stays: the new stream sends every page once more.
   */
  setBlocks(blocks: readonly RamBlockInfo[]): void {
    if (this.final.length > 0) return;
    let total = 0;
    this.blockStart = blocks.map((b) => {
      const start = total;
      total += b.usedLength / TPS;
      return start;
    });
    this.final = new Int32Array(total).fill(NEVER_SENT);
    this.blocks = blocks.map((b) => ({ name: b.name, pages: b.usedLength / TPS }));
  }

  /** Some page's latest content is held nowhere any more (a relay with its only copy went). */
  namesLostContent(): boolean {
    this.settle();
    const final = this.final;
    for (let i = 0; i < final.length; i++) {
      const c = final[i]!;
      if (c >= 0 && this.placement.isLost(c)) return true;
    }
    return false;
  }

  /** Page `index` (over all blocks) has content held nowhere any more. */
  isLost(index: number): boolean {
    this.settle();
    const c = this.final[index]!;
    return c >= 0 && this.placement.isLost(c);
  }

  /**
   * A resumed postcopy source sent again a page whose content was lost: it
   * must be that content (the source is stopped), which is placed again;
   * the page's map entry stands.
   */
  refill(block: number, page: number, content: Uint8Array | null): void {
    this.settle();
    const c = this.final[this.blockStart[block]! + page]!;
    if (c < 0 || content === null) throw new SgmError("data", `the resumed source sent page ${page} of block ${block} again, which it was not asked for`);
    digestPage(content, this.scratch);
    const expected = this.placement.digestOf(c);
    for (let k = 0; k < DIGEST_BYTES; k++) {
      if (this.scratch[k] !== expected[k]) throw new SgmError("data", `the resumed source sent page ${page} of block ${block} with other content than before`);
    }
    this.placement.place(this.scratch, 0, content);
    // no map frame follows to carry it: its bytes, and its locations once acknowledged (release), go now
    this.placement.flush();
  }

  page(block: number, page: number, content: Uint8Array | null): void {
    if (this.batches) {
      this.batches.page(block, page, content);
      return;
    }
    this.run!.page(block, page, content, this.applied);
  }

  /** The reader starts on a chunk of the source's stream: its pages may wait to be hashed together (endChunk). */
  beginChunk(chunk: Uint8Array): void {
    this.run?.begin(chunk);
  }

  /** The chunk is read: every page of it is applied by now. */
  endChunk(): void {
    this.settle();
    this.run?.end();
  }

  /** Applies the pages waiting in the run; anything else of the stream comes after them. */
  settle(): void {
    this.run?.settle(this.applied);
  }

  /** Where a failure in applying records that waited for digests goes (the source stream ends with it). */
  setErrorHandler(handler: (err: SgmError) => void): void {
    this.onError = handler;
  }

  /** The source should be read no further until whenRoom(): too many pages wait for digests. */
  get backlogged(): boolean {
    return this.batches?.backlogged ?? false;
  }

  whenRoom(): Promise<void> {
    return this.batches?.whenRoom() ?? Promise.resolve();
  }

  /** A postcopy source discarded the page: whatever the gather has for it is stale until it comes again. */
  pending(block: number, page: number): void {
    this.settle();
    if (this.batches) this.batches.pending(block, page);
    else this.applied.pending(block, page);
  }

  /** The digest of the final page map; every page the source discarded must have come again. */
  finalMapDigest(vmName: string): string {
    this.settle();
    const final = this.final;
    const owed = final.indexOf(PENDING);
    if (owed >= 0) throw new SgmError("data", `VM ${vmName}: the source's stream ended without page ${owed} it had discarded`);
    const wrong = injected("scatter-map") ? final.findIndex((c) => c >= 0) : -1;
    const writeDigest = (i: number, out: Uint8Array, at: number): boolean => {
      const c = final[i]!;
      if (c < 0) return false;
      this.placement.copyDigest(c, out, at);
      if (i === wrong) for (let k = at; k < at + DIGEST_BYTES; k++) out[k] = out[k]! ^ 0xff;
      return true;
    };
    dumpFinalMap(vmName, this.blocks, final.length, writeDigest);
    return pageMapDigest(final.length, writeDigest);
  }

  /**
   * A page the destination waits for, after switchover: its content goes to
   * the gather at once and its map entry ahead of the frames waiting for
   * relays. Safe to reorder: every earlier entry naming this page left before
   * the device state did, and a postcopy source sends a page once.
   */
  urgent(block: number, page: number, content: Uint8Array | null): void {
    this.settle();
    if (this.batches) {
      this.batches.urgent(block, page, content);
      return;
    }
    const zero = content === null || isZeroPage(content);
    if (!zero) digestPage(content, this.scratch);
    this.applied.urgent(block, page, zero ? null : this.scratch, 0, zero ? null : content);
  }

  /** Ends the current map frame (after every record before it); it leaves as soon as what it names is held. */
  flush(): void {
    this.settle();
    if (this.batches) this.batches.flush();
    else this.flushMap();
  }

  /** The records, each applied in turn, with its digest. */
  private readonly applied: RecordSink = {
    page: (block, page, digests, at, content) => {
      this.stats.pages++;
      this.progress.added++;
      const entryAt = this.map.addDigest(block, page, digests, at);
      const known = this.placement.contents;
      this.final[this.blockStart[block]! + page] = this.placement.place(this.map.buffer, entryAt, content);
      if (this.placement.contents > known) this.stats.newPages++;
      else this.stats.dedupPages++;
      if (this.map.full || this.placement.unpinsWaitForMap) this.flushMap();
    },
    zero: (block, page) => {
      this.stats.pages++;
      this.progress.added++;
      this.stats.zeroPages++;
      this.map.addZero(block, page);
      this.final[this.blockStart[block]! + page] = ZERO;
      if (this.map.full || this.placement.unpinsWaitForMap) this.flushMap();
    },
    pending: (block, page) => {
      this.stats.pendingPages++;
      this.progress.added++;
      this.map.addPending(block, page);
      this.final[this.blockStart[block]! + page] = PENDING;
      if (this.map.full) this.flushMap();
    },
    urgent: (block, page, digests, at, content) => {
      this.stats.pages++;
      this.stats.urgentPages++;
      const one = new PageMapBuilder(() => new Uint8Array(8 + 7 + 32));
      const index = this.blockStart[block]! + page;
      if (digests === null || content === null) {
        this.stats.zeroPages++;
        one.addZero(block, page);
        this.final[index] = ZERO;
      } else {
        const entryAt = one.addDigest(block, page, digests, at);
        this.final[index] = this.placement.placeUrgent(one.buffer, entryAt, content);
      }
      const { payload } = one.take(this.vm);
      this.stats.mapBytes += payload.length;
      this.placement.sendLocations();
      // not counted in the map progress: it goes at once, and content unpinned
      // after it is unpinned after it on the wire too
      this.placement.gather.send(FrameType.PAGE_MAP, payload);
    },
    flush: () => this.flushMap(),
  };

  private flushMap(): void {
    if (this.map.entries === 0) return;
    this.placement.flush();
    const entries = this.map.entries;
    const { payload, buffer } = this.map.take(this.vm);
    this.fifo.push({ payload, buffer, marks: this.placement.sentMarks(), entries });
    this.release();
  }

  /** The VM's memory, once the source has named its RAM blocks. */
  get totalBytes(): number | null {
    return this.final.length === 0 ? null : this.final.length * TPS;
  }

  /** Map frames built but not yet sent (waiting for relay acknowledgements). */
  get waiting(): number {
    return this.fifo.length;
  }

  /** Resolves once every record so far is applied and every map frame has gone to the gather. */
  async whenAllSent(): Promise<void> {
    if (this.batches) await this.batches.whenIdle();
    if (this.fifo.length === 0) return;
    return new Promise((resolve) => this.drained.push(resolve));
  }

  /** Content was placed again after a refusal: frames built before must wait for it. */
  private raiseMarks(): void {
    for (const frame of this.fifo) this.placement.raiseMarks(frame.marks);
  }

  close(): void {
    // records still waiting for digests belong to an eviction that is over
    this.batches?.stop();
    this.run?.clear();
    this.offAcked();
    // frames never sent now name nothing the gather must keep
    this.progress.sent = this.progress.added;
    this.placement.flushUnpins();
  }

  private release(): void {
    const gather = this.placement.gather;
    while (this.fifo.length > 0 && this.placement.isAcked(this.fifo[0]!.marks)) {
      const frame = this.fifo.shift()!;
      this.placement.sendLocations();
      this.stats.mapBytes += frame.payload.length;
      gather.send(FrameType.PAGE_MAP, frame.payload);
      this.mapBuffers.queued(frame.buffer, gather.bytesAccepted);
      this.progress.sent += frame.entries;
    }
    if (this.fifo.length === 0) {
      // content placed with no map entry behind it (refill) is located all the same
      this.placement.sendLocations();
      for (const resolve of this.drained.splice(0)) resolve();
    }
    this.placement.flushUnpins();
  }
}
