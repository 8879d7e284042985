// Where a destination feed's pumps (precopy-feed.ts, postcopy-delivery.ts)
// hand their pages over: the one place page bytes go to the destination
// QEMU, and where a page written lets go of the content it owed (at once
// before switchover; after it once the destination confirms the page,
// delivery-acks.ts). The test faults that keep a page from the destination
// (test-faults.ts) act here too.

import type { PostcopyStreamWriter } from "../qemu/postcopy-writer.ts";
import { DIGEST_BYTES, PAGE_BYTES, digestPage, sameDigest } from "../dedup/digest.ts";
import { SgmError } from "../errors.ts";
import { injected, withheldPages } from "../test-faults.ts";
import type { ContentDirectory } from "./content-directory.ts";
import { DeliveryAcks } from "./delivery-acks.ts";
import type { FeedStats } from "./feed-stats.ts";
import type { OwedContent } from "./owed-content.ts";
import type { PageTable } from "./page-table.ts";

export interface WritesContext {
  table: PageTable;
  dir: ContentDirectory;
  owed: OwedContent;
  stats: FeedStats;
  /** The stream to the destination QEMU, made as the feed connects. */
  writer(): Pick<PostcopyStreamWriter, "page" | "ping" | "flush">;
  /** The feed is in its postcopy phase: switched over, and not ended or failed. */
  postcopy(): boolean;
  /** Each page's bytes are checked against its content's digest before they go (tests: checkWrites). */
  checkBytes: boolean;
}

export class PageWrites {
  private skipOne = injected("gather-delivery");
  /** SGM_TEST_FAULT=gather-withhold's pages; null without it. */
  readonly withheld = withheldPages();
  private pingQueued = false;
  private readonly scratch = new Uint8Array(DIGEST_BYTES);
  /** Pages written after switchover keep their content until the destination confirms them. */
  readonly acks: DeliveryAcks;
  private readonly ctx: WritesContext;
  private readonly table: PageTable;
  private readonly dir: ContentDirectory;

  constructor(ctx: WritesContext) {
    this.ctx = ctx;
    this.table = ctx.table;
    this.dir = ctx.dir;
    this.acks = new DeliveryAcks(
      (value) => ctx.writer().ping(value),
      (i) => ctx.owed.letGo(i),
    );
  }

  /** After switchover: page i goes to the destination, once. */
  deliver(i: number): void {
    const t = this.table;
    const c = t.content[i]!;
    t.delivered[i] = 1;
    if (this.skipOne && c >= 0) {
      this.skipOne = false; // SGM_TEST_FAULT=gather-delivery: the delivery check must notice
      this.ctx.owed.letGo(i);
    } else this.write(i, c);
    this.ctx.stats.deliveredPages++;
  }

  /**
   * The one place page bytes go to the destination. Before switchover the
   * page owes nothing more (if the gather dies then, the VM runs on at the
   * source); after it, once the destination confirms the page (acks).
   */
  write(i: number, c: number): void {
    if (this.withholds(i)) return;
    const t = this.table;
    const b = t.blockOf(i);
    if (c >= 0) {
      if (this.ctx.checkBytes) this.checkBytes(c);
      this.ctx.writer().page(b, i - t.blockStart[b]!, this.dir.slabOf(c), this.dir.offsetOf(c));
    } else this.ctx.writer().page(b, i - t.blockStart[b]!, null);
    t.written[i] = c;
    if (!this.ctx.postcopy()) {
      this.ctx.owed.letGo(i);
      return;
    }
    // not let go yet: the acks do once QEMU confirms
    this.acks.written(i);
    if (this.pingQueued) return;
    this.pingQueued = true;
    queueMicrotask(() => {
      // a PING behind what this turn wrote, so no page waits for 64 more to be confirmed
      this.pingQueued = false;
      if (!this.ctx.postcopy()) return;
      this.acks.mark();
      this.ctx.writer().flush();
    });
  }

  /** The bytes about to be written are content c's: a slot that came to hold other bytes fails here. */
  private checkBytes(c: number): void {
    const at = this.dir.offsetOf(c);
    digestPage(this.dir.slabOf(c).subarray(at, at + PAGE_BYTES), this.scratch);
    if (!sameDigest(this.scratch, 0, this.dir.digestOf(c), 0)) throw new SgmError("internal", `the bytes held for content ${c} are not that content`);
  }

  /** SGM_TEST_FAULT=gather-withhold: the page never reaches QEMU, its content kept as if it were on its way. */
  withholds(i: number): boolean {
    const w = this.withheld;
    if (w === null) return false;
    const t = this.table;
    const b = t.blockOf(i);
    const page = i - t.blockStart[b]!;
    return t.blocks[b]!.name === w.block && page >= w.first && page <= w.last;
  }
}
