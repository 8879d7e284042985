// Turns the pages a source QEMU sends into PAGE_DATA and PAGE_MAP frames:
// each non-zero page is hashed; content seen before (in any VM of this run)
// goes out as a reference only, new content goes out once. Every page's
// (block, page) -> digest or zero record goes to the gather, so it always
// knows the latest version of every page.

import { digestPage, DIGEST_BYTES, isZeroPage } from "../dedup/digest.ts";
import type { DigestIndex } from "../dedup/digest-index.ts";
import { RecycledBuffers } from "../net/recycled-buffers.ts";
import { FrameType, PageDataBuilder, PageMapBuilder } from "../wire/messages.ts";

/** Where frames go: a connection to the gather (later, to relays too). */
export interface FrameSink {
  send(type: number, payload: Uint8Array): void;
  /** Frame bytes handed to the kernel so far. */
  readonly bytesSent: number;
  /** Frame bytes waiting to be. */
  readonly queuedBytes: number;
}

export interface PipelineStats {
  /** Page records read from the source, zero or not, counting re-sent pages. */
  pages: number;
  zeroPages: number;
  /** Pages whose content went out (new to this run). */
  newPages: number;
  /** Pages sent as a reference to content already sent. */
  dedupPages: number;
  dataBytes: number;
  mapBytes: number;
}

export class PagePipeline {
  readonly stats: PipelineStats = { pages: 0, zeroPages: 0, newPages: 0, dedupPages: 0, dataBytes: 0, mapBytes: 0 };
  private readonly vm: number;
  private readonly index: DigestIndex;
  private readonly sink: FrameSink;
  private readonly dataBuffers: RecycledBuffers;
  private readonly mapBuffers: RecycledBuffers;
  private readonly data: PageDataBuilder;
  private readonly map: PageMapBuilder;

  constructor(vm: number, index: DigestIndex, sink: FrameSink) {
    this.vm = vm;
    this.index = index;
    this.sink = sink;
    this.dataBuffers = new RecycledBuffers(PageDataBuilder.BUFFER_BYTES, () => sink.bytesSent);
    this.mapBuffers = new RecycledBuffers(PageMapBuilder.BUFFER_BYTES, () => sink.bytesSent);
    this.data = new PageDataBuilder(() => this.dataBuffers.acquire());
    this.map = new PageMapBuilder(() => this.mapBuffers.acquire());
  }

  page(block: number, page: number, content: Uint8Array | null): void {
    this.stats.pages++;
    // QEMU 9.0+ with zero-page-detection=none sends zero pages as content
    if (content === null || isZeroPage(content)) {
      this.stats.zeroPages++;
      this.map.addZero(block, page);
    } else {
      const entry = this.map.addDigest(block, page);
      digestPage(content, entry.buf, entry.at);
      if (this.index.lookup(entry.buf, entry.at) >= 0) {
        this.stats.dedupPages++;
      } else {
        this.index.insert(entry.buf, entry.at);
        this.stats.newPages++;
        const slot = this.data.add(content);
        slot.buf.set(entry.buf.subarray(entry.at, entry.at + DIGEST_BYTES), slot.at);
        if (this.data.full) this.flushData();
      }
    }
    if (this.map.full) this.flush();
  }

  /** Sends what is batched: contents first, so every map entry's content is already there. */
  flush(): void {
    this.flushData();
    if (this.map.entries > 0) {
      const { payload, buffer } = this.map.take(this.vm);
      this.stats.mapBytes += payload.length;
      this.sink.send(FrameType.PAGE_MAP, payload);
      this.mapBuffers.queued(buffer, this.sink.bytesSent + this.sink.queuedBytes);
    }
  }

  private flushData(): void {
    if (this.data.pages === 0) return;
    const { payload, buffer } = this.data.take();
    this.stats.dataBytes += payload.length;
    this.sink.send(FrameType.PAGE_DATA, payload);
    this.dataBuffers.queued(buffer, this.sink.bytesSent + this.sink.queuedBytes);
  }
}
