// What the relays hold for any run of an evacuation, by relay address, as
// their acknowledgements said: a run bound for another destination finds
// here content already on a relay and asks that relay to hold it for its
// own run too (a HOLD of the digest), instead of sending the page again.
// It may be out of date (the run that put it has released it since); the
// relay's answer to the HOLD is what counts, and a refusal is forgotten here.

import { DigestIndex } from "../dedup/digest-index.ts";

export class RelayContents {
  private readonly index = new DigestIndex();
  private masks = new Uint32Array(1024);
  private readonly addresses: string[] = [];

  /** The bit that stands for the relay at `address` in the masks below (the relays are those --via names: at most 32). */
  relayBit(address: string): number {
    let bit = this.addresses.indexOf(address);
    if (bit < 0) bit = this.addresses.push(address) - 1;
    return 1 << bit;
  }

  /** The relays (bits) that hold the content with this digest, as far as is known. */
  maskOf(digest: Uint8Array, at: number): number {
    const id = this.index.lookup(digest, at);
    return id < 0 ? 0 : this.masks[id]!;
  }

  /** The relay of `bit` holds the content with this digest. */
  held(bit: number, digest: Uint8Array, at: number): void {
    let id = this.index.lookup(digest, at);
    if (id < 0) id = this.index.insert(digest, at);
    if (id >= this.masks.length) {
      const grown = new Uint32Array(Math.max(id + 1, this.masks.length * 2));
      grown.set(this.masks);
      this.masks = grown;
    }
    this.masks[id]! |= bit;
  }

  /** The relay of `bit` does not hold it (any more). */
  forget(bit: number, digest: Uint8Array, at: number): void {
    const id = this.index.lookup(digest, at);
    if (id >= 0) this.masks[id]! &= ~bit;
  }
}
