// The page records of one chunk of a source's stream, applied in order once
// the chunk is read, with the pages hashed together (digest.ts
// digestPagesAt: natively, sixteen at a time) instead of in one call a
// page, for a scatter that hashes on its reader's thread.
//
// Only pages lying in the chunk itself join a run, and zero pages between
// them: the reader's views of the chunk stay whole while it reads that
// chunk (it never writes into it), where a page carried over from the chunk
// before lies in the reader's own buffer, which it reuses. The caller
// settles the run before anything else of the stream is applied, and
// before the chunk ends.

import { DIGEST_BYTES, PAGE_BYTES, digestPage, digestPagesAt, isZeroPage } from "../dedup/digest.ts";
import { SgmError } from "../errors.ts";
import type { ReaderHandler } from "../qemu/reader-handler.ts";

const MAX_PAGES = 128;
const MAX_RECORDS = 1024;

export interface RunSink {
  page(block: number, page: number, digests: Uint8Array, at: number, content: Uint8Array): void;
  zero(block: number, page: number): void;
}

export class PageRun {
  private chunk: Uint8Array | null = null;
  private readonly blocks = new Int32Array(MAX_RECORDS);
  private readonly pages = new Int32Array(MAX_RECORDS);
  /** Per record: its page's place among the run's pages, or -1 for a zero page. */
  private readonly slots = new Int32Array(MAX_RECORDS);
  private records = 0;
  /** Per page of the run: where it lies in the chunk, and the reader's view of it. */
  private readonly offsets = new Uint32Array(MAX_PAGES);
  private contents: Uint8Array[] = [];
  private readonly digests = new Uint8Array(MAX_PAGES * DIGEST_BYTES);
  private readonly scratch = new Uint8Array(DIGEST_BYTES);

  /** The reader starts on `chunk`. */
  begin(chunk: Uint8Array): void {
    if (this.records > 0) throw new SgmError("internal", "a page run left unsettled from the chunk before");
    this.chunk = chunk;
  }

  /** The chunk is read; the run must be settled by now. */
  end(): void {
    if (this.records > 0) throw new SgmError("internal", "a page run left unsettled at the end of its chunk");
    this.chunk = null;
  }

  /**
   * A page record as the reader hands it over (null: a zero page): it
   * waits in the run, or, when it cannot, the run is settled and the page
   * applied now.
   */
  page(block: number, page: number, content: Uint8Array | null, sink: RunSink): void {
    if (content === null || isZeroPage(content)) {
      if (this.addZero(block, page)) return;
      this.settle(sink);
      sink.zero(block, page);
      return;
    }
    if (this.addPage(block, page, content)) return;
    this.settle(sink);
    if (this.addPage(block, page, content)) return;
    digestPage(content, this.scratch);
    sink.page(block, page, this.scratch, 0, content);
  }

  /** True when the page joined the run. */
  private addPage(block: number, page: number, content: Uint8Array): boolean {
    const chunk = this.chunk;
    if (chunk === null || content.buffer !== chunk.buffer || content.length !== PAGE_BYTES) return false;
    if (this.contents.length === MAX_PAGES || this.records === MAX_RECORDS) return false;
    const at = content.byteOffset - chunk.byteOffset;
    if (at < 0 || at + PAGE_BYTES > chunk.length) return false;
    this.offsets[this.contents.length] = at;
    this.add(block, page, this.contents.length);
    this.contents.push(content);
    return true;
  }

  /** True when the zero page joined a run in progress, to be applied in its turn. */
  private addZero(block: number, page: number): boolean {
    if (this.records === 0 || this.records === MAX_RECORDS) return false;
    this.add(block, page, -1);
    return true;
  }

  /** Hashes the run's pages in one call and applies its records in order; the run is empty after, whatever `sink` throws. */
  settle(sink: RunSink): void {
    const records = this.records;
    if (records === 0) return;
    const contents = this.contents;
    this.records = 0;
    this.contents = [];
    digestPagesAt(this.chunk!, this.offsets, contents.length, this.digests);
    for (let r = 0; r < records; r++) {
      const slot = this.slots[r]!;
      if (slot < 0) sink.zero(this.blocks[r]!, this.pages[r]!);
      else sink.page(this.blocks[r]!, this.pages[r]!, this.digests, slot * DIGEST_BYTES, contents[slot]!);
    }
  }

  /** Forgets the run unapplied: the eviction is over. */
  clear(): void {
    this.records = 0;
    this.contents = [];
  }

  private add(block: number, page: number, slot: number): void {
    const r = this.records++;
    this.blocks[r] = block;
    this.pages[r] = page;
    this.slots[r] = slot;
  }
}

/**
 * The reader's handler with every record but a page applied after the
 * pages read before it, which may wait in a run: `settle` applies them.
 */
export function settlingFirst(handler: ReaderHandler, settle: () => void): ReaderHandler {
  const settled = { ...handler };
  for (const key of Object.keys(handler) as Array<keyof ReaderHandler>) {
    if (key === "onPage") continue;
    const call = handler[key] as (...args: unknown[]) => void;
    (settled[key] as (...args: unknown[]) => void) = (...args) => {
      settle();
      call(...args);
    };
  }
  return settled;
}
