// What the scatter has pinned at the gather: content it sent there directly,
// which the gather keeps only because the scatter may name it again (the
// dedup index remembers it). The gather's memory must not grow with the VM,
// so the pinned set is bounded: past the budget the content least recently
// named is unpinned (CLOCK), and sent again if it comes back. An UNPIN goes
// to the gather only once every map entry written before the decision has
// been sent, so no map frame still to come names content the gather let go.

import { DIGEST_BYTES } from "../dedup/digest.ts";

/** Map entries one VM's pipeline has written, and how many of them it has sent. */
export interface MapProgress {
  added: number;
  sent: number;
}

export class GatherPins {
  readonly budget: number;
  private pinned = new Uint8Array(1024);
  private referenced = new Uint8Array(1024);
  private readonly ring: Int32Array;
  private count = 0;
  private hand = 0;
  private readonly streams: MapProgress[] = [];
  private readonly queue: Array<{ cid: number; digest: Uint8Array; mark: number[]; cancelled: boolean }> = [];
  /** Per content: the queue entry of its UNPIN not sent yet. */
  private readonly unsent = new Map<number, { cancelled: boolean }>();
  private queueHead = 0;

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

  isPinned(cid: number): boolean {
    return this.pinned[cid] === 1;
  }

  /** A map entry names pinned content again: it stays a while longer. */
  touch(cid: number): void {
    this.referenced[cid] = 1;
  }

  /**
   * The content was sent to the gather: it is pinned there. Past the budget
   * another is unpinned; `digestOf` gives that one's digest for its UNPIN.
   */
  pin(cid: number, digestOf: (cid: number) => Uint8Array): void {
    this.grow(cid);
    if (this.pinned[cid] === 1) {
      this.referenced[cid] = 1;
      return;
    }
    this.pinned[cid] = 1;
    // sent again before its UNPIN left: the gather must not get that UNPIN after these bytes
    const stale = this.unsent.get(cid);
    if (stale) {
      stale.cancelled = true;
      this.unsent.delete(cid);
    }
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
      const entry = { cid: held, digest: digestOf(held).slice(0, DIGEST_BYTES), mark: this.streams.map((s) => s.added), cancelled: false };
      this.queue.push(entry);
      this.unsent.set(held, entry);
      this.ring[this.hand] = cid;
      this.hand = (this.hand + 1) % this.budget;
      return;
    }
  }

  /** Digests whose UNPIN may go now: every map entry written before it has been sent. */
  takeReady(): Uint8Array[] {
    const ready: Uint8Array[] = [];
    while (this.queueHead < this.queue.length) {
      const next = this.queue[this.queueHead]!;
      if (!next.cancelled && !next.mark.every((added, k) => this.streams[k]!.sent >= added)) break;
      if (!next.cancelled) {
        ready.push(next.digest);
        this.unsent.delete(next.cid);
      }
      this.queueHead++;
    }
    if (this.queueHead > 1024 && this.queueHead * 2 > this.queue.length) {
      this.queue.splice(0, this.queueHead);
      this.queueHead = 0;
    }
    return ready;
  }

  private grow(cid: number): void {
    if (cid < this.pinned.length) return;
    const size = Math.max(cid + 1, this.pinned.length * 2);
    const pinned = new Uint8Array(size);
    pinned.set(this.pinned);
    this.pinned = pinned;
    const referenced = new Uint8Array(size);
    referenced.set(this.referenced);
    this.referenced = referenced;
  }
}
