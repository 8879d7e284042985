// What the relays hold for any run of an evacuation, by relay address, as
// their acknowledgements said: a run bound for another destination finds
// here content already on a relay and asks that relay to hold it for its
// own run too (a HOLD of the digest), instead of sending the page again.
// Each run keeps what it puts on a relay for the evacuation too (a KEEP
// under the evacuation's keeper id, sent right behind the PUT), so content
// stays after the run's gather has fetched and released it, for runs that
// start later, as long as the relay has room no run needs; the evacuation
// drops it at its end (relay-unkeep). So this may be out of date (the relay
// gave the room to a new page since); the relay's answer to the HOLD is
// what counts, and a refusal is forgotten here.

import { randomBytes } from "node:crypto";
import { DigestIndex } from "../dedup/digest-index.ts";
import { grown, grownSize } from "../typed-arrays.ts";

export class RelayContents {
  /** The id the relays keep this evacuation's content under. */
  readonly keeper: Uint8Array = randomBytes(16);
  private readonly index = new DigestIndex();
  private masks = new Uint32Array(1024);
  private readonly addresses: string[] = [];

  /** The bit that stands for the relay at `address` in the masks below (the relays are those --via names: at most 32). */
  relayBit(address: string): number {
    let bit = this.addresses.indexOf(address);
    if (bit < 0) bit = this.addresses.push(address) - 1;
    return 1 << bit;
  }

  /** Every relay given a bit: those a run has placed on. */
  get relayAddresses(): readonly string[] {
    return this.addresses;
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
    if (id >= this.masks.length) this.masks = grown(this.masks, grownSize(id, this.masks.length));
    this.masks[id]! |= bit;
  }

  /** The relay of `bit` is gone: it holds nothing. */
  forgetRelay(bit: number): void {
    for (let id = 0; id < this.masks.length; id++) this.masks[id]! &= ~bit;
  }

  /** The relay of `bit` does not hold it (any more). */
  forget(bit: number, digest: Uint8Array, at: number): void {
    const id = this.index.lookup(digest, at);
    if (id >= 0) this.masks[id]! &= ~bit;
  }
}
