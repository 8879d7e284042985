// Before switchover: pages go to the destination as the gather learns their
// content, as fast as QEMU reads and no faster. A page whose content is on
// a relay waits for it (parked) and comes back here when it arrives; a page
// whose content changes while queued is written once, with the newest.
// Switchover stops the pump where it is: what is left goes after it
// (postcopy-delivery.ts).

import type { FeedContext } from "./feed-context.ts";
import { PENDING, UNKNOWN } from "./page-table.ts";

/** Queue bounds towards QEMU before switchover. */
const PRECOPY_HIGH = 1024 * 1024;
const PRECOPY_LOW = 256 * 1024;

export interface PrecopyContext extends FeedContext {
  /** The page is held back (a test fault): it is not written. */
  withholds(i: number): boolean;
  /** Writes page i's content `c` to the destination. */
  write(i: number, c: number): void;
}

export class PrecopyFeed {
  private readonly ctx: PrecopyContext;
  private readonly queue: number[] = [];
  private head = 0;
  /** A page is in the queue (once, however often its content changes). */
  private readonly queued: Uint8Array;
  /** The pump runs, or is about to (on a microtask). */
  private pumping = false;
  private pumped: Promise<void> = Promise.resolve();

  constructor(ctx: PrecopyContext) {
    this.ctx = ctx;
    this.queued = new Uint8Array(ctx.table.total);
  }

  /** Settles once the pump has stopped (at switchover, it stops at once). */
  get stopped(): Promise<void> {
    return this.pumped;
  }

  /** Page i's content may differ from what the destination was fed. */
  enqueue(i: number): void {
    if (this.queued[i]) return;
    this.queued[i] = 1;
    this.queue.push(i);
    if (!this.pumping) {
      this.pumping = true;
      // once the frames being read are applied: their pages go to QEMU
      // together, in few sections and writes, not a section and a write each
      this.pumped = Promise.resolve().then(() => this.pump());
    }
  }

  private async pump(): Promise<void> {
    const { table: t, dir, sock, writer, waits } = this.ctx;
    try {
      // stops the moment switchover begins: what is left is delivered after it
      while (this.head < this.queue.length && this.ctx.active()) {
        if (sock.queuedBytes > PRECOPY_HIGH) {
          writer.flush();
          await sock.whenWritable(PRECOPY_LOW);
          continue;
        }
        const i = this.queue[this.head++]!;
        this.queued[i] = 0;
        waits.unpark(i);
        const c = t.content[i]!;
        if (c === UNKNOWN || c === PENDING || t.fed[i] === c) continue;
        if (c >= 0 && !dir.isLocal(c)) {
          // on a relay: fetch it at the gather's pace and come back to this page (arrived)
          waits.park(i, c);
          this.ctx.fetch(c, false);
          continue;
        }
        if (this.ctx.withholds(i)) continue;
        this.ctx.write(i, c);
        t.fed[i] = c;
        this.ctx.stats.fedPages++;
      }
      writer.flush();
      this.queue.length = 0;
      this.head = 0;
    } catch (err) {
      this.ctx.fail(err as Error);
    } finally {
      this.pumping = false;
    }
  }
}
