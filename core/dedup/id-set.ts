// A set of page-store ids (those one run holds on a relay, a store's spare
// pages), as a bitmap: store ids are
// dense (freed ids are reused first), so a bit each beats a Set's tens of
// bytes, and a bitmap is not an object for the collector to walk. The
// relay collects garbage every 16 MiB it reads; with a Set of a few
// hundred thousand ids per run, each collection took ~20 ms.

import { grown } from "../typed-arrays.ts";

export class IdSet {
  private bits = new Uint8Array(1024);
  private count = 0;
  /** Where any() looks first: ids are taken from the front in turn, not always the lowest. */
  private cursor = 0;

  get size(): number {
    return this.count;
  }

  has(id: number): boolean {
    const byte = id >>> 3;
    return byte < this.bits.length && (this.bits[byte]! & (1 << (id & 7))) !== 0;
  }

  /** Adds `id`; false if it was there already. */
  add(id: number): boolean {
    const byte = id >>> 3;
    if (byte >= this.bits.length) this.grow(byte);
    const mask = 1 << (id & 7);
    if (this.bits[byte]! & mask) return false;
    this.bits[byte]! |= mask;
    this.count++;
    return true;
  }

  /** Removes `id`; false if it was not there. */
  delete(id: number): boolean {
    if (!this.has(id)) return false;
    this.bits[id >>> 3]! &= ~(1 << (id & 7));
    this.count--;
    return true;
  }

  /** Some id in the set, or -1 when it is empty: each call goes on from where the last one found its id. */
  any(): number {
    if (this.count === 0) return -1;
    const bits = this.bits;
    for (let n = 0; n < bits.length; n++) {
      const byte = (this.cursor + n) % bits.length;
      const b = bits[byte]!;
      if (b === 0) continue;
      this.cursor = byte;
      return byte * 8 + (31 - Math.clz32(b & -b));
    }
    return -1;
  }

  /** Every id held, in ascending order. */
  *[Symbol.iterator](): IterableIterator<number> {
    const bits = this.bits;
    for (let byte = 0; byte < bits.length; byte++) {
      const b = bits[byte]!;
      if (b === 0) continue;
      for (let bit = 0; bit < 8; bit++) if (b & (1 << bit)) yield byte * 8 + bit;
    }
  }

  private grow(byte: number): void {
    let length = this.bits.length * 2;
    while (length <= byte) length *= 2;
    this.bits = grown(this.bits, length);
  }
}
