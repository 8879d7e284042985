// Room for pages in memory: 4 KiB slots in 4 MiB slabs, a slot freed being
// the next one taken, so memory stays at the high-water mark of pages held
// at once and freed slots are reused while still mapped (no fresh page
// faults). Slots carry no identity; their owner says what is in them.

import { PAGE_BYTES } from "./digest.ts";
import { allocateSlab } from "./slab-memory.ts";

const SLAB_PAGES = 1024;

export class PageSlots {
  private readonly slabs: Uint8Array[] = [];
  private readonly free: number[] = [];
  private next = 0;
  /** Slots in use. */
  used = 0;

  /** A slot holding a copy of `page`. */
  put(page: Uint8Array): number {
    const slot = this.free.pop() ?? this.next++;
    const slab = slot >>> 10;
    if (slab === this.slabs.length) this.slabs.push(allocateSlab(SLAB_PAGES * PAGE_BYTES));
    this.view(slot).set(page);
    this.used++;
    return slot;
  }

  /** The page in `slot`, as a view: good until the slot is freed. */
  view(slot: number): Uint8Array {
    const start = (slot & (SLAB_PAGES - 1)) * PAGE_BYTES;
    return this.slabs[slot >>> 10]!.subarray(start, start + PAGE_BYTES);
  }

  freeSlot(slot: number): void {
    this.free.push(slot);
    this.used--;
  }

  get usedBytes(): number {
    return this.used * PAGE_BYTES;
  }
}
