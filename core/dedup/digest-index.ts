// A hash table from 32-byte page digests to dense integer ids (0, 1, 2, ...).
// It holds millions of entries on the hot path of a 2 GB/s stream, so it
// keeps no per-entry JS objects and no string keys: digests live back to back
// in one Uint8Array indexed by id, and an open-addressing table with linear
// probing maps a digest's hash to its id.
//
// The digests are BLAKE3 outputs, already uniformly random, so the hash is
// just their first 8 bytes folded to 32 bits. Synthetic digests that share
// those 8 bytes would all land in one probe run; real ones never do.

import { SgmError } from "../errors.ts";
import { DIGEST_BYTES, copyBytes } from "./digest.ts";
import { grown, grownSize } from "../typed-arrays.ts";

const EMPTY = -1;
const MIN_SLOTS = 16;
const MIN_IDS = 16;

function hashAt(d: Uint8Array, o: number): number {
  const w0 = d[o]! | (d[o + 1]! << 8) | (d[o + 2]! << 16) | (d[o + 3]! << 24);
  const w1 = d[o + 4]! | (d[o + 5]! << 8) | (d[o + 6]! << 16) | (d[o + 7]! << 24);
  // The multiply moves w1's entropy into the low bits the mask keeps.
  return w0 ^ Math.imul(w1, 0x9e3779b1);
}

function slotCountFor(entries: number): number {
  let n = MIN_SLOTS;
  while (n < entries * 2) n *= 2;
  return n;
}

export class DigestIndex {
  // Two int32 per slot: the id (EMPTY when free) and the digest's hash.
  // With the hash at hand, probes pass over other entries, growth rehashes,
  // and deletion finds an entry's home slot, all without reading digests.
  private slots: Int32Array;
  private mask: number;
  private digests: Uint8Array;
  private live: Uint8Array;
  private readonly freeIds: number[] = [];
  private nextId = 0;
  private count = 0;
  private readonly reuseIds: boolean;

  /**
   * With `reuseIds` false a removed digest's id is never handed out again
   * and its digest stays readable (digestEverHeld), at 32 bytes per id.
   */
  constructor(expectedEntries = 0, options: { reuseIds?: boolean } = {}) {
    this.reuseIds = options.reuseIds ?? true;
    const slotCount = slotCountFor(expectedEntries);
    this.slots = new Int32Array(slotCount * 2).fill(EMPTY);
    this.mask = slotCount - 1;
    const idCapacity = Math.max(MIN_IDS, expectedEntries);
    this.digests = new Uint8Array(idCapacity * DIGEST_BYTES);
    this.live = new Uint8Array(idCapacity);
  }

  /** Number of digests held. */
  get size(): number {
    return this.count;
  }

  /** The id of the digest at digest[offset .. offset + 32), or -1 if absent. */
  lookup(digest: Uint8Array, offset = 0): number {
    checkDigest(digest, offset);
    const h = hashAt(digest, offset);
    return this.slots[2 * this.findSlot(digest, offset, h)]!; // EMPTY is -1
  }

  /**
   * The id of the digest at digest[offset .. offset + 32), inserting it if
   * absent. A new digest gets the most recently removed id, if any, else the
   * next unused one, so ids stay dense.
   */
  insert(digest: Uint8Array, offset = 0): number {
    checkDigest(digest, offset);
    const h = hashAt(digest, offset);
    let i = this.findSlot(digest, offset, h);
    const existing = this.slots[2 * i]!;
    if (existing !== EMPTY) return existing;

    if ((this.count + 1) * 2 > this.mask + 1) {
      this.growSlots();
      i = this.findSlot(digest, offset, h);
    }
    const id = this.allocateId();
    // A byte loop: cheaper than set() from a subarray, which allocates a view.
    const stored = this.digests;
    const base = id * DIGEST_BYTES;
    for (let k = 0; k < DIGEST_BYTES; k++) stored[base + k] = digest[offset + k]!;
    this.live[id] = 1;
    this.slots[2 * i] = id;
    this.slots[2 * i + 1] = h;
    this.count++;
    return id;
  }

  /** Removes the entry with this id; the id may be handed out again by a later insert. */
  remove(id: number): void {
    this.checkLive(id);
    const slots = this.slots;
    const mask = this.mask;
    let hole = hashAt(this.digests, id * DIGEST_BYTES) & mask;
    while (slots[2 * hole] !== id) hole = (hole + 1) & mask;

    // Backward-shift deletion instead of tombstones: pull each later entry of
    // the probe run into the hole when the hole lies between that entry's home
    // slot and where it sits, so lookups never walk past dead slots.
    let j = hole;
    for (;;) {
      j = (j + 1) & mask;
      const movedId = slots[2 * j]!;
      if (movedId === EMPTY) break;
      const movedHash = slots[2 * j + 1]!;
      const home = movedHash & mask;
      if (((j - home) & mask) >= ((j - hole) & mask)) {
        slots[2 * hole] = movedId;
        slots[2 * hole + 1] = movedHash;
        hole = j;
      }
    }
    slots[2 * hole] = EMPTY;

    this.live[id] = 0;
    if (this.reuseIds) this.freeIds.push(id);
    this.count--;
  }

  /** True when `id` names a digest currently held. */
  has(id: number): boolean {
    return Number.isInteger(id) && id >= 0 && id < this.nextId && this.live[id] === 1;
  }

  /**
   * The digest of a held id, as a view into the index's storage: it is only
   * good until the next insert (which may move storage) or removal of `id`
   * (which may let another digest take the id). Copy it to keep it.
   */
  digestOf(id: number): Uint8Array {
    this.checkLive(id);
    return this.digests.subarray(id * DIGEST_BYTES, (id + 1) * DIGEST_BYTES);
  }

  /** Copies the digest of a held id to out[at .. at + 32). */
  copyDigest(id: number, out: Uint8Array, at: number): void {
    this.checkLive(id);
    copyBytes(this.digests, id * DIGEST_BYTES, out, at, DIGEST_BYTES);
  }

  /**
   * The digest an id was given, even after its removal, in an index that
   * does not reuse ids; a view, good until the next insert.
   */
  digestEverHeld(id: number): Uint8Array {
    this.checkEverHeld(id);
    return this.digests.subarray(id * DIGEST_BYTES, (id + 1) * DIGEST_BYTES);
  }

  /** Copies the digest an id was given, as digestEverHeld names it, to out[at .. at + 32). */
  copyDigestEverHeld(id: number, out: Uint8Array, at: number): void {
    this.checkEverHeld(id);
    copyBytes(this.digests, id * DIGEST_BYTES, out, at, DIGEST_BYTES);
  }

  private checkEverHeld(id: number): void {
    if (this.reuseIds || !(Number.isInteger(id) && id >= 0 && id < this.nextId)) {
      throw new SgmError("internal", `digest id ${id} was never held, or ids are reused`);
    }
  }

  /** The slot holding this digest, or else the empty slot that ends its probe run. */
  private findSlot(digest: Uint8Array, offset: number, h: number): number {
    const slots = this.slots;
    const mask = this.mask;
    let i = h & mask;
    for (;;) {
      const id = slots[2 * i]!;
      if (id === EMPTY) return i;
      if (slots[2 * i + 1] === h && this.storedEquals(id, digest, offset)) return i;
      i = (i + 1) & mask;
    }
  }

  private storedEquals(id: number, digest: Uint8Array, offset: number): boolean {
    const stored = this.digests;
    const base = id * DIGEST_BYTES;
    for (let k = 0; k < DIGEST_BYTES; k++) {
      if (stored[base + k] !== digest[offset + k]) return false;
    }
    return true;
  }

  private allocateId(): number {
    const reused = this.freeIds.pop();
    if (reused !== undefined) return reused;
    const id = this.nextId++;
    if (id >= this.live.length) {
      const capacity = grownSize(id, this.live.length);
      this.digests = grown(this.digests, capacity * DIGEST_BYTES);
      this.live = grown(this.live, capacity);
    }
    return id;
  }

  private growSlots(): void {
    const old = this.slots;
    const slotCount = (this.mask + 1) * 2;
    const slots = new Int32Array(slotCount * 2).fill(EMPTY);
    const mask = slotCount - 1;
    for (let k = 0; k < old.length; k += 2) {
      const id = old[k]!;
      if (id === EMPTY) continue;
      const h = old[k + 1]!;
      let i = h & mask;
      while (slots[2 * i] !== EMPTY) i = (i + 1) & mask;
      slots[2 * i] = id;
      slots[2 * i + 1] = h;
    }
    this.slots = slots;
    this.mask = mask;
  }

  private checkLive(id: number): void {
    if (!this.has(id)) throw new SgmError("internal", `digest id ${id} is not in the index`);
  }
}

function checkDigest(digest: Uint8Array, offset: number): void {
  if (!(offset >= 0 && offset + DIGEST_BYTES <= digest.length)) {
    throw new SgmError("internal", `no ${DIGEST_BYTES}-byte digest at offset ${offset} of ${digest.length}`);
  }
}
