// Content-addressed page storage in memory, for relays and the gather: each
// distinct page is held once, however many VMs or senders put it, and is
// freed when the last holder releases it.
//
// A page's id is its DigestIndex id, and it also names its slot: slab
// id / slabPages, page id % slabPages. The index reuses released ids before
// handing out new ones, so no id reaches the peak number of pages held, and
// slabs are allocated only as that peak grows (or all at once, resident,
// by preallocate()). Slab memory stays at its high-water mark, which the
// capacity bounds to within one slab.
//
// A page may also be kept: held while room allows, for content that may be
// asked for again (a relay keeps what an evacuation put, for its runs to
// other destinations). A kept page whose last reference goes stays, as
// spare; spare pages count as free room, and one is dropped when a new page
// needs its slot (evictSpare) or its last keeper lets go (unkeep).

import { SgmError } from "../errors.ts";
import { DigestIndex } from "./digest-index.ts";
import { IdSet } from "./id-set.ts";
import { PAGE_BYTES, copyBytes } from "./digest.ts";
import { allocateResidentSlab, allocateSlab } from "./slab-memory.ts";
import { grown, grownSize } from "../typed-arrays.ts";

export interface PageStoreOptions {
  /** Bound on the bytes of pages held; Infinity (the default) for none. */
  capacityBytes?: number;
  /** Pages per slab, a power of two; 1024 (4 MiB slabs) by default. */
  slabPages?: number;
}

export interface PutResult {
  id: number;
  /** True when the page was new and copied in; false when its digest was already held. */
  added: boolean;
}

export class PageStore {
  readonly capacityBytes: number;
  private readonly maxPages: number;
  private readonly slabShift: number;
  private readonly slabMask: number;
  private readonly index = new DigestIndex();
  private readonly slabs: (Uint8Array | undefined)[] = [];
  // Indexed by id; 0 for an id not held, or held only as spare.
  private refCounts = new Int32Array(1024);
  // Indexed by id: how many keepers keep the page.
  private keepCounts = new Int32Array(1024);
  /** Ids held only because they are kept. */
  private readonly spare = new IdSet();
  private peak = 0;

  constructor(options: PageStoreOptions = {}) {
    const capacityBytes = options.capacityBytes ?? Infinity;
    if (!(capacityBytes >= 0)) throw new SgmError("internal", `page store capacity ${capacityBytes} is not a size`);
    const slabPages = options.slabPages ?? 1024;
    if (!(Number.isInteger(slabPages) && slabPages > 0 && (slabPages & (slabPages - 1)) === 0)) {
      throw new SgmError("internal", `page store slab of ${slabPages} pages is not a power of two`);
    }
    this.capacityBytes = capacityBytes;
    this.maxPages = Math.floor(capacityBytes / PAGE_BYTES);
    this.slabShift = Math.log2(slabPages);
    this.slabMask = slabPages - 1;
  }

  /**
   * Allocates up to `count` more of the slabs the capacity needs, resident
   * at once, so that pages put later go into memory already there; returns
   * how many are still to allocate. Needs a finite capacity.
   */
  preallocate(count = Infinity): number {
    if (!Number.isFinite(this.capacityBytes)) throw new SgmError("internal", "a page store without a capacity cannot be preallocated");
    const slabPages = this.slabMask + 1;
    const needed = Math.ceil(this.maxPages / slabPages);
    for (let n = 0; n < needed; n++) {
      if (this.slabs[n] !== undefined) continue;
      if (count-- <= 0) return needed - n;
      this.slabs[n] = allocateResidentSlab(slabPages * PAGE_BYTES);
    }
    return 0;
  }

  /** Bytes of the slabs allocated so far. */
  get slabBytes(): number {
    return this.slabs.reduce((n, slab) => n + (slab?.length ?? 0), 0);
  }

  /** Distinct pages held. */
  get pages(): number {
    return this.index.size;
  }

  /** Bytes of page content held: pages × 4096, spare pages included. */
  get usedBytes(): number {
    return this.index.size * PAGE_BYTES;
  }

  /** No new page fits until one goes (a spare one may: evictSpare). */
  get full(): boolean {
    return this.index.size >= this.maxPages;
  }

  /** Bytes of pages held only because they are kept: room a new page may take. */
  get spareBytes(): number {
    return this.spare.size * PAGE_BYTES;
  }

  /** The most bytes of page content held at once. */
  get peakBytes(): number {
    return this.peak * PAGE_BYTES;
  }

  /**
   * Holds one reference to the page whose digest is digest[digestOffset ..
   * digestOffset + 32).
   *
   * If that digest is already held, its reference count goes up by one and
   * `page` is neither read nor compared: the digest is trusted to name the
   * content. This succeeds even when the store is full, as it takes no memory.
   *
   * Otherwise the 4096 bytes of `page` from `pageAt` are copied in with a count of one,
   * unless that would take the store past its capacity: then nothing changes
   * and put returns null. A full store is an expected condition for a relay
   * (the sender should go elsewhere or wait), not an error, hence no throw.
   */
  put(digest: Uint8Array, digestOffset: number, page: Uint8Array, pageAt = 0): PutResult | null {
    if (!(pageAt >= 0 && pageAt + PAGE_BYTES <= page.length)) {
      throw new SgmError("internal", `page store given a page at ${pageAt} of ${page.length} bytes: no ${PAGE_BYTES} bytes there`);
    }
    const existing = this.index.lookup(digest, digestOffset);
    if (existing !== -1) {
      this.retain(existing);
      return { id: existing, added: false };
    }
    if (this.index.size >= this.maxPages) return null;

    const id = this.index.insert(digest, digestOffset);
    copyBytes(page, pageAt, this.slabOf(id, true), this.slotStart(id), PAGE_BYTES);
    if (id >= this.refCounts.length) {
      const size = grownSize(id, this.refCounts.length);
      this.refCounts = grown(this.refCounts, size);
      this.keepCounts = grown(this.keepCounts, size);
    }
    this.refCounts[id] = 1;
    this.keepCounts[id] = 0;
    if (this.index.size > this.peak) this.peak = this.index.size;
    return { id, added: true };
  }

  /**
   * The 4096 bytes of a held page, as a view into the store: good until the
   * page's last reference is released, after which another page may take
   * the slot. Copy it to keep it longer.
   */
  get(id: number): Uint8Array {
    this.checkHeld(id);
    return this.slotView(id);
  }

  /** Copies held page `id` into target[targetAt ..). */
  copyOut(id: number, target: Uint8Array, targetAt: number): void {
    this.checkHeld(id);
    copyBytes(this.slabOf(id, false), this.slotStart(id), target, targetAt, PAGE_BYTES);
  }

  /** The id of the page with this digest, or -1 if it is not held. */
  idOf(digest: Uint8Array, digestOffset = 0): number {
    return this.index.lookup(digest, digestOffset);
  }

  /** The page with this digest, as get() returns it, or undefined if not held. */
  getByDigest(digest: Uint8Array, digestOffset = 0): Uint8Array | undefined {
    const id = this.index.lookup(digest, digestOffset);
    return id === -1 ? undefined : this.slotView(id);
  }

  has(digest: Uint8Array, digestOffset = 0): boolean {
    return this.index.lookup(digest, digestOffset) !== -1;
  }

  /** The digest of a held page; a view good until the next put or release. */
  digestOf(id: number): Uint8Array {
    this.checkHeld(id);
    return this.index.digestOf(id);
  }

  /** References held on page `id`; 0 if it is not held. */
  refCount(id: number): number {
    return this.index.has(id) ? this.refCounts[id]! : 0;
  }

  /** Adds a reference to a held page (a spare one included: it is no longer spare). */
  retain(id: number): void {
    this.checkHeld(id);
    if (this.refCounts[id]!++ === 0) this.spare.delete(id);
  }

  /** Adds a keeper to a held page: it stays as spare when its last reference goes. */
  keep(id: number): void {
    this.checkHeld(id);
    this.keepCounts[id]!++;
  }

  /** Drops a keeper; a spare page that loses its last keeper is gone (as release() at 0). */
  unkeep(id: number): void {
    this.checkHeld(id);
    if (this.keepCounts[id]! <= 0) throw new SgmError("internal", `page ${id} is not kept`);
    if (--this.keepCounts[id]! === 0 && this.refCounts[id] === 0) this.drop(id);
  }

  /** Drops a spare page to free its slot; returns its id (no longer held), or -1 when none is spare. */
  evictSpare(): number {
    const id = this.spare.any();
    if (id === -1) return -1;
    this.keepCounts[id] = 0;
    this.drop(id);
    return id;
  }

  /**
   * Drops one reference to a held page and returns how many remain. At 0 the
   * page is gone, unless kept (then it is spare): its slot and id may be
   * reused by the next put, so neither the id nor views from get() may be
   * used again.
   */
  release(id: number): number {
    this.checkHeld(id);
    if (this.refCounts[id]! <= 0) throw new SgmError("internal", `page ${id} has no reference to release`);
    const remaining = --this.refCounts[id]!;
    if (remaining === 0) {
      if (this.keepCounts[id]! > 0) this.spare.add(id);
      else this.drop(id);
    }
    return remaining;
  }

  private drop(id: number): void {
    this.spare.delete(id);
    this.index.remove(id);
  }

  private slotView(id: number): Uint8Array {
    const start = this.slotStart(id);
    return this.slabOf(id, false).subarray(start, start + PAGE_BYTES);
  }

  private slabOf(id: number, allocate: boolean): Uint8Array {
    const slabNumber = id >>> this.slabShift;
    let slab = this.slabs[slabNumber];
    if (slab === undefined) {
      if (!allocate) throw new SgmError("internal", `page ${id} has no slab`);
      slab = allocateSlab((this.slabMask + 1) * PAGE_BYTES);
      this.slabs[slabNumber] = slab;
    }
    return slab;
  }

  /** Where page `id` starts in its slab. */
  private slotStart(id: number): number {
    return (id & this.slabMask) * PAGE_BYTES;
  }

  private checkHeld(id: number): void {
    if (!this.index.has(id)) throw new SgmError("internal", `page ${id} is not in the store`);
  }
}
