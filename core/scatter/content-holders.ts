// Where each content a run placed is held, by content id: the relays that
// acknowledged a copy (a bit each), the copies still on their way to relays,
// and whether a lost relay took its only copy. What placement.ts asks before
// it places content again, and what it changes as relays answer or go.

import { grown, grownSize } from "../typed-arrays.ts";

export class ContentHolders {
  /** Copies on their way to relays, not yet acknowledged. */
  private pending = new Uint8Array(1024);
  /** The relays that acknowledged a copy, a bit each. */
  private mask = new Uint32Array(1024);
  /** 1 for content whose only copy went with a lost relay, until it is placed again. */
  private lost = new Uint8Array(1024);

  /** Makes room for content ids up to `cid`. */
  grow(cid: number): void {
    if (cid < this.pending.length) return;
    const size = grownSize(cid, this.pending.length);
    this.pending = grown(this.pending, size);
    this.mask = grown(this.mask, size);
    this.lost = grown(this.lost, size);
  }

  pendingOf(cid: number): number {
    return this.pending[cid]!;
  }

  /** The relays holding the content, a bit each. */
  maskOf(cid: number): number {
    return this.mask[cid]!;
  }

  holds(cid: number, relay: number): boolean {
    return (this.mask[cid]! & (1 << relay)) !== 0;
  }

  isLost(cid: number): boolean {
    return this.lost[cid] === 1;
  }

  /** The content is placed (again): whatever copy was lost, this one is not. */
  placed(cid: number): void {
    this.lost[cid] = 0;
  }

  /** `copies` go to relays now; nothing of it is in flight before. */
  sending(cid: number, copies: number): void {
    this.pending[cid] = copies;
  }

  /** Relay `relay` acknowledged its copy; returns the copies still on their way. */
  stored(cid: number, relay: number): number {
    this.mask[cid]! |= 1 << relay;
    return --this.pending[cid]!;
  }

  /** A copy on its way found no holder; returns the copies still on their way. */
  unplaced(cid: number): number {
    return --this.pending[cid]!;
  }

  /**
   * Relay `relay` is gone and holds nothing: returns how many contents it
   * held the only copy of, which are lost unless `elsewhere` holds them.
   */
  dropRelay(relay: number, elsewhere: (cid: number) => boolean): number {
    const bit = 1 << relay;
    let alone = 0;
    for (let cid = 0; cid < this.mask.length; cid++) {
      if ((this.mask[cid]! & bit) === 0) continue;
      this.mask[cid]! &= ~bit;
      if (this.mask[cid] === 0 && this.pending[cid] === 0 && !elsewhere(cid)) {
        this.lost[cid] = 1;
        alone++;
      }
    }
    return alone;
  }
}
