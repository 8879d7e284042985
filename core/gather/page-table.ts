// What the gather knows of one VM's pages, indexed by a global page number
// over all RAM blocks: the content each page must end up with (a content
// id, or zero), the content fed to the destination before switchover,
// whether the page was delivered after switchover, and what the destination
// was last given for it.

import { TPS } from "../qemu/constants.ts";
import type { RamBlockInfo } from "../qemu/stream-reader.ts";

/** Content: the page is all zero. */
export const ZERO = -1;
/** Content: no record of the page yet (QEMU sends every page; reads as zero). */
export const UNKNOWN = -2;
/** Fed: nothing was fed for this page before switchover. */
export const NOT_FED = -3;
/** Content: a postcopy source discarded the page; it sends the page again. */
export const PENDING = -4;
/** Written: the destination holds nothing of ours for the page (never written, or discarded); it reads as zero. */
export const NOT_WRITTEN = -5;

export class PageTable {
  readonly blocks: readonly RamBlockInfo[];
  readonly blockStart: Int32Array;
  readonly total: number;
  readonly content: Int32Array;
  readonly fed: Int32Array;
  readonly delivered: Uint8Array;
  /** The content last written to the destination for each page (a content id, ZERO or NOT_WRITTEN). */
  readonly written: Int32Array;
  /** The page owes the destination its content, and holds a need on it until written. */
  readonly owing: Uint8Array;

  constructor(blocks: readonly RamBlockInfo[]) {
    this.blocks = blocks;
    this.blockStart = new Int32Array(blocks.length + 1);
    let total = 0;
    blocks.forEach((block, i) => {
      this.blockStart[i] = total;
      total += block.usedLength / TPS;
    });
    this.blockStart[blocks.length] = total;
    this.total = total;
    this.content = new Int32Array(total).fill(UNKNOWN);
    this.fed = new Int32Array(total).fill(NOT_FED);
    this.delivered = new Uint8Array(total);
    this.written = new Int32Array(total).fill(NOT_WRITTEN);
    this.owing = new Uint8Array(total);
  }

  index(block: number, page: number): number {
    return this.blockStart[block]! + page;
  }

  blockOf(index: number): number {
    // blocks are few (about ten); a linear scan beats anything clever
    let b = 0;
    while (this.blockStart[b + 1]! <= index) b++;
    return b;
  }

  /** Does the destination need this page (again) after switchover? */
  needsDelivery(index: number): boolean {
    const c = this.content[index]!;
    return !this.delivered[index] && this.fed[index] !== c && c >= 0;
  }
}
