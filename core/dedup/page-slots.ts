// Room for pages in memory: 4 KiB slots in 4 MiB slabs, a slot freed being
// the next one taken, so memory stays at the high-water mark of pages held
// at once and freed slots are reused while still mapped (no fresh page
// faults). Slots carry no identity; their owner says what is in them.

import { PAGE_BYTES, copyBytes } from "./digest.ts";
import { allocateSlab } from "./slab-memory.ts";

const SLAB_PAGES = 1024;

export class PageSlots {
  private readonly slabs: Uint8Array[] = [];
  private readonly free: number[] = [];
  private next = 0;
  /** Slots in use. */
  used = 0;

  /** A slot holding a copy of the page at bytes[at .. at + 4096). */
  put(bytes: Uint8Array, at = 0): number {
    const slot = this.free.pop() ?? this.next++;
    const slab = slot >>> 10;
    if (slab === this.slabs.length) this.slabs.push(allocateSlab(SLAB_PAGES * PAGE_BYTES));
    // by offset, not through a view: a view per page cost the gather a tenth of its main thread
    copyBytes(bytes, at, this.slabs[slab]!, this.offsetOf(slot), PAGE_BYTES);
    this.used++;
    return slot;
  }

  /** The page in `slot`, as a view: good until the slot is freed. */
  view(slot: number): Uint8Array {
    const start = this.offsetOf(slot);
    return this.slabOf(slot).subarray(start, start + PAGE_BYTES);
  }

  /** The slab the page in `slot` lies in, at offsetOf(slot): good until the slot is freed. */
  slabOf(slot: number): Uint8Array {
    return this.slabs[slot >>> 10]!;
  }

  offsetOf(slot: number): number {
    return (slot & (SLAB_PAGES - 1)) * PAGE_BYTES;
  }

  freeSlot(slot: number): void {
    this.free.push(slot);
    this.used--;
  }

  get usedBytes(): number {
    return this.used * PAGE_BYTES;
  }
}
