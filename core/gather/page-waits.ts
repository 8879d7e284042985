// Pages of one destination that wait for their content to come from a
// relay, listed per content id in typed arrays: a page waits on one content
// at most, and parking, unparking and waking cost no allocation. Kept as
// closures and sets, the gather of a 2 GiB VM through relays held hundreds
// of bytes per page that waited, and its memory grew with the VM.

import { grown, grownSize } from "../typed-arrays.ts";

const NONE = -1;

export class PageWaits {
  /** First page waiting on each content id. */
  private head = new Int32Array(1024).fill(NONE);
  private readonly next: Int32Array;
  private readonly prev: Int32Array;
  /** The content each page waits on, or NONE. */
  private readonly on: Int32Array;
  /** Pages waiting now. */
  count = 0;

  constructor(pages: number) {
    this.next = new Int32Array(pages).fill(NONE);
    this.prev = new Int32Array(pages).fill(NONE);
    this.on = new Int32Array(pages).fill(NONE);
  }

  isWaiting(page: number): boolean {
    return this.on[page]! !== NONE;
  }

  /** Page `page` waits on content `cid` (and on nothing else). */
  park(page: number, cid: number): void {
    if (this.on[page] === cid) return;
    this.unpark(page);
    if (cid >= this.head.length) this.grow(cid);
    const first = this.head[cid]!;
    this.next[page] = first;
    this.prev[page] = NONE;
    if (first !== NONE) this.prev[first] = page;
    this.head[cid] = page;
    this.on[page] = cid;
    this.count++;
  }

  unpark(page: number): void {
    const cid = this.on[page]!;
    if (cid === NONE) return;
    const before = this.prev[page]!;
    const after = this.next[page]!;
    if (before === NONE) this.head[cid] = after;
    else this.next[before] = after;
    if (after !== NONE) this.prev[after] = before;
    this.on[page] = NONE;
    this.count--;
  }

  /** Unparks every page waiting on `cid` and hands each to `wake`. */
  wake(cid: number, wake: (page: number) => void): void {
    if (cid >= this.head.length) return;
    let page = this.head[cid]!;
    this.head[cid] = NONE;
    while (page !== NONE) {
      const after = this.next[page]!;
      this.on[page] = NONE;
      this.count--;
      wake(page);
      page = after;
    }
  }

  /** Nothing waits any more. */
  clear(): void {
    this.head.fill(NONE);
    this.on.fill(NONE);
    this.count = 0;
  }

  private grow(cid: number): void {
    this.head = grown(this.head, grownSize(cid, this.head.length), NONE);
  }
}
