// After switchover: every page the destination still lacks goes to it
// exactly once, the pages it asks for (requests on its return path) ahead of
// the background push. Content on relays is fetched first: at once for a
// requested page, in the background for the rest; a page a postcopy source
// still owes is asked of the source, through the scatter.

import { TPS } from "../qemu/constants.ts";
import type { FeedContext } from "./feed-context.ts";
import { PENDING, UNKNOWN, ZERO } from "./page-table.ts";

/** Bytes queued towards QEMU: small, so a requested page never waits behind much. */
export const POSTCOPY_HIGH = 512 * 1024;
const POSTCOPY_LOW = 128 * 1024;

export interface DeliveryContext extends FeedContext {
  /** Bytes per second for the background push; requested pages are never held back. */
  bandwidth: number;
  /** Asks the scatter for a page a postcopy source has not sent again yet. */
  fromSource(block: number, page: number): void;
  /** Writes page i's content `c` to the destination (marks it delivered first). */
  deliver(i: number): void;
  /** Delivery may have become idle: the feed sees whether the stream can end. */
  progressed(): void;
}

export class PostcopyDelivery {
  private readonly ctx: DeliveryContext;
  /** Pages to deliver, in order, by the background loop. */
  private queue: number[] = [];
  private head = 0;
  private delivering = false;
  /** Pending pages the destination asked for; the source was asked for them. */
  private readonly askedSource = new Set<number>();
  /** Pages the destination asked for whose content is on its way from a relay. */
  private readonly askedRelay = new Set<number>();
  private flushQueued = false;

  constructor(ctx: DeliveryContext) {
    this.ctx = ctx;
  }

  /** Nothing is queued, running or awaited. */
  get idle(): boolean {
    return !this.delivering && this.head >= this.queue.length && this.ctx.waits.count === 0;
  }

  /** Queues every page the destination lacks now, and starts pushing. */
  start(): void {
    const t = this.ctx.table;
    for (let i = 0; i < t.total; i++) if (t.needsDelivery(i)) this.queue.push(i);
    this.run();
  }

  /** A postcopy source sent page i again (its content is set): deliver it. */
  sourcePage(i: number, cid: number): void {
    if (this.askedSource.delete(i)) {
      // the destination waits for it
      this.serve(i);
      this.ctx.writer.flush();
      return;
    }
    if (cid >= 0) {
      this.queue.push(i);
      this.run();
    } else this.ctx.progressed();
  }

  /** The destination waits for pages first..first+count-1 of block b. */
  request(b: number, first: number, count: number): void {
    const { table: t, stats } = this.ctx;
    let served = 0;
    for (let p = first; p < first + count && t.blockStart[b]! + p < t.blockStart[b + 1]!; p++) {
      const i = t.index(b, p);
      // already sent (maybe still in flight): QEMU takes no page twice, so never resend
      if (t.delivered[i] || this.askedSource.has(i)) continue;
      served++;
      if (t.content[i] === PENDING) {
        // still at the source: ask it, through the scatter
        this.askedSource.add(i);
        stats.requestedFromSource++;
        this.ctx.fromSource(b, p);
        continue;
      }
      this.serve(i);
    }
    if (served > 0) {
      stats.requestedPagesServed += served;
      this.ctx.writer.flush();
    }
  }

  private run(): void {
    // a page at a time joins a running loop: no promise for each
    if (this.delivering) return;
    void this.loop().catch((err: Error) => this.ctx.fail(err));
  }

  /** The background push, with backpressure and the bandwidth cap. */
  private async loop(): Promise<void> {
    this.delivering = true;
    const { table: t, dir, sock, writer } = this.ctx;
    const started = performance.now();
    let pushed = 0;
    try {
      while (this.head < this.queue.length && this.ctx.active()) {
        const i = this.queue[this.head++]!;
        if (!t.needsDelivery(i)) continue;
        const c = t.content[i]!;
        if (!dir.isLocal(c)) {
          this.ctx.waits.park(i, c);
          this.ctx.fetch(c, false);
          continue;
        }
        this.ctx.deliver(i);
        pushed += TPS;
        if (sock.queuedBytes > POSTCOPY_HIGH) {
          writer.flush();
          await sock.whenWritable(POSTCOPY_LOW);
        }
        const ahead = (pushed / this.ctx.bandwidth) * 1000 - (performance.now() - started);
        if (ahead > 5) {
          writer.flush();
          await Bun.sleep(ahead);
        }
      }
      this.queue.length = 0;
      this.head = 0;
      if (this.ctx.active()) writer.flush();
    } finally {
      this.delivering = false;
    }
    this.ctx.progressed();
  }

  /** A page the destination waits for: now, or as soon as its relay answers. */
  private serve(i: number): void {
    const { table: t, dir } = this.ctx;
    if (t.content[i] === UNKNOWN) t.content[i] = ZERO;
    const c = t.content[i]!;
    if (c >= 0 && !dir.isLocal(c)) {
      this.ctx.stats.requestedFromRelays++;
      this.askedRelay.add(i);
      this.ctx.waits.park(i, c);
      this.ctx.fetch(c, true);
      return;
    }
    this.ctx.deliver(i);
  }

  /**
   * Content for page i came from a relay. A page the destination waits for
   * goes at once; the rest join the push, which waits while QEMU is behind:
   * delivered as they came, the relays' replies queued towards a slower
   * QEMU without bound (10 MiB at a switchover here, on top of the bounds).
   * A page queued so keeps its content here, and so counts as owed.
   */
  arrived(i: number): void {
    if (!this.ctx.active()) return;
    const asked = this.askedRelay.delete(i);
    if (this.ctx.table.needsDelivery(i)) {
      if (asked || this.ctx.sock.queuedBytes <= POSTCOPY_HIGH) {
        this.ctx.deliver(i);
        this.flushSoon();
      } else {
        this.queue.push(i);
        this.run();
        return;
      }
    }
    this.ctx.progressed();
  }

  private flushSoon(): void {
    if (this.flushQueued) return;
    this.flushQueued = true;
    queueMicrotask(() => {
      this.flushQueued = false;
      if (this.ctx.active()) this.ctx.writer.flush();
    });
  }
}
