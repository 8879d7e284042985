// What the scatter has pinned at the gather: content it sent there directly,
// which the gather keeps only because the scatter may name it again (the
// dedup index remembers it). The gather's memory must not grow with the VM,
// so the pinned set is bounded: past the budget the content least recently
// named is unpinned (CLOCK), and sent again if it comes back. An UNPIN goes
// to the gather only once every map entry written before the decision has
// been sent, so no map frame still to come names content the gather let go.

import { grown, grownSize } from "../typed-arrays.ts";

/** Map entries one VM's pipeline has written, and how many of them it has sent. */
export interface MapProgress {
  added: number;
  sent: number;
}

/** Unpins decided between two takeReady calls, and the map entries written by the last of them. */
interface Batch {
  cids: number[];
  /** Each content's pin generation when it was unpinned: a later pin cancels the unpin. */
  generations: number[];
  mark: number[];
}

export class GatherPins {
  readonly budget: number;
  private pinned = new Uint8Array(1024);
  private referenced = new Uint8Array(1024);
  /** Bumped by every pin, so an unpin decided before it is known stale. */
  private generation = new Uint32Array(1024);
  private readonly ring: Int32Array;
  private count = 0;
  private hand = 0;
  private readonly streams: MapProgress[] = [];
  private open: Batch = { cids: [], generations: [], mark: [] };
  private readonly queue: Batch[] = [];

  /** `budget`: pages of content at most pinned at the gather. */
  constructor(budget: number) {
    this.budget = budget;
    this.ring = new Int32Array(budget);
  }

  /** A VM's pipeline registers the progress of its map entries. */
  mapStream(): MapProgress {
    const progress = { added: 0, sent: 0 };
    this.streams.push(progress);
    return progress;
  }

  /**
   * Unpins decided since the last takeReady: the gather still holds their
   * content, on top of the budget, until the map entries before them go.
   */
  get undecidedUnpins(): number {
    return this.open.cids.length;
  }

  isPinned(cid: number): boolean {
    return this.pinned[cid] === 1;
  }

  /** A map entry names pinned content again: it stays a while longer. */
  touch(cid: number): void {
    this.referenced[cid] = 1;
  }

  /** The content was sent to the gather: it is pinned there. Past the budget another is unpinned. */
  pin(cid: number): void {
    this.grow(cid);
    if (this.pinned[cid] === 1) {
      this.referenced[cid] = 1;
      return;
    }
    this.pinned[cid] = 1;
    // an unpin decided before these bytes were sent must not reach the gather after them
    this.generation[cid]!++;
    if (this.count < this.budget) {
      this.ring[this.count++] = cid;
      return;
    }
    for (;;) {
      const held = this.ring[this.hand]!;
      if (this.referenced[held] === 1) {
        this.referenced[held] = 0;
        this.hand = (this.hand + 1) % this.budget;
        continue;
      }
      this.pinned[held] = 0;
      this.open.cids.push(held);
      this.open.generations.push(this.generation[held]!);
      this.ring[this.hand] = cid;
      this.hand = (this.hand + 1) % this.budget;
      return;
    }
  }

  /** Contents whose UNPIN may go now: every map entry written before it has been sent. */
  takeReady(): number[] {
    if (this.open.cids.length > 0) {
      // stamped now, after every unpin in it was decided: waiting longer is safe
      this.open.mark = this.streams.map((s) => s.added);
      this.queue.push(this.open);
      this.open = { cids: [], generations: [], mark: [] };
    }
    const ready: number[] = [];
    while (this.queue.length > 0) {
      const batch = this.queue[0]!;
      if (!batch.mark.every((added, k) => this.streams[k]!.sent >= added)) break;
      this.queue.shift();
      batch.cids.forEach((cid, n) => {
        if (this.generation[cid] === batch.generations[n]) ready.push(cid);
      });
    }
    return ready;
  }

  private grow(cid: number): void {
    if (cid < this.pinned.length) return;
    const size = grownSize(cid, this.pinned.length);
    this.pinned = grown(this.pinned, size);
    this.referenced = grown(this.referenced, size);
    this.generation = grown(this.generation, size);
  }
}
