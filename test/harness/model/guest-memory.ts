// Guest memory for model QEMUs: every page holds a content id (0 is the
// zero page) whose 4 KiB follow from the id alone, so the same id is the same
// page in any VM, and a page's bytes say which id they are.

import { TPS } from "../../../core/qemu/constants.ts";

export interface BlockLayout {
  name: string;
  pages: number;
}

/** The 4096 bytes of content `id` (null for 0, the zero page). */
export function contentBytes(id: number): Uint8Array | null {
  if (id === 0) return null;
  const page = new Uint8Array(TPS);
  const words = new Uint32Array(page.buffer);
  words[0] = 0x4c444f4d; // "MODL"
  words[1] = id;
  let x = (id * 0x9e3779b1) ^ 0x85ebca6b;
  for (let w = 2; w < words.length; w++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[w] = x >>> 0;
  }
  return page;
}

/** Which content id these bytes are (0 for zero), or -1 if they are no content id's page. */
export function contentIdOf(bytes: Uint8Array): number {
  if (bytes.every((b) => b === 0)) return 0;
  const id = new DataView(bytes.buffer, bytes.byteOffset, 8).getUint32(4, true);
  const expected = contentBytes(id);
  return expected && Buffer.compare(expected, bytes) === 0 ? id : -1;
}

/** Pages of every block, indexed globally in block order. */
export class GuestMemory {
  readonly blocks: readonly BlockLayout[];
  readonly blockStart: number[];
  readonly total: number;
  /** Content id of every page. */
  readonly content: Int32Array;

  constructor(blocks: readonly BlockLayout[]) {
    this.blocks = blocks;
    let total = 0;
    this.blockStart = blocks.map((b) => {
      const start = total;
      total += b.pages;
      return start;
    });
    this.total = total;
    this.content = new Int32Array(total);
  }

  blockOf(index: number): { block: number; page: number } {
    let b = 0;
    while (b + 1 < this.blocks.length && this.blockStart[b + 1]! <= index) b++;
    return { block: b, page: index - this.blockStart[b]! };
  }
}
