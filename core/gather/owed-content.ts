// The needs one destination feed holds on content (content-directory.ts),
// so that the bytes stay until the destination has them: one for each page
// that owes the destination its current content, let go once written
// there, and, with a precopy source from its end to switchover, one for the
// spare page a switchover may have to give up (switchover-discards.ts).

import type { ContentDirectory } from "./content-directory.ts";
import type { PageTable } from "./page-table.ts";
import { pickSpare } from "./switchover-discards.ts";

export class OwedContent {
  private readonly table: PageTable;
  private readonly dir: ContentDirectory;
  /** With a precopy source, from its end to switchover: a page whose content a need keeps here. */
  private spareAt = -1;

  constructor(table: PageTable, dir: ContentDirectory) {
    this.table = table;
    this.dir = dir;
  }

  /** The spare page; -1 if none is kept. */
  get spare(): number {
    return this.spareAt;
  }

  /**
   * Page i's content is `cid` now: the page owes it to the destination
   * (holds a need on it) unless the destination has it already.
   */
  setContent(i: number, cid: number): void {
    const t = this.table;
    const owes = cid >= 0 && t.delivered[i] !== 1 && t.fed[i] !== cid;
    // the new need is taken before the old one goes: named again with the
    // same content, the page's need may be the content's last hold, and the
    // content would be forgotten in between (its bytes dropped, never fetched)
    if (owes) this.dir.need(cid);
    this.letGo(i);
    t.content[i] = cid;
    if (owes) t.owing[i] = 1;
  }

  letGo(i: number): void {
    const t = this.table;
    if (t.owing[i] === 0) return;
    t.owing[i] = 0;
    this.dir.unneed(t.content[i]!);
  }

  /** Picks the spare page and keeps its content here with a need. */
  keepSpare(): void {
    this.spareAt = pickSpare(this.table, this.dir);
    const c = this.spareAt >= 0 ? this.table.content[this.spareAt]! : -1;
    if (c >= 0) this.dir.need(c);
  }

  /** Lets go of the spare page's content, if a spare was kept. */
  dropSpare(): void {
    const t = this.table;
    if (this.spareAt >= 0 && t.content[this.spareAt]! >= 0) this.dir.unneed(t.content[this.spareAt]!);
    this.spareAt = -1;
  }

  /** Pages that still owe the destination content `lacking` picks (the spare page too). */
  pages(lacking: (cid: number) => boolean): number {
    const t = this.table;
    let pages = 0;
    for (let i = 0; i < t.total; i++) {
      const c = t.content[i]!;
      if (c >= 0 && (t.owing[i] === 1 || i === this.spareAt) && lacking(c)) pages++;
    }
    return pages;
  }

  /**
   * The feed failed: its pages owe nothing more here, so other VMs' pages
   * are not held back behind them (the owed bytes). A VM that ran here keeps
   * its content on the relays for a gather started with --resume (retained:
   * never released while this gather runs); its local bytes are in its
   * saved state.
   */
  letGoAll(retain: boolean): void {
    const t = this.table;
    // pages written and not confirmed owe still, and are let go below with the rest
    this.dropSpare();
    for (let i = 0; i < t.total; i++) {
      if (t.owing[i] === 0) continue;
      if (retain) this.dir.retain(t.content[i]!);
      this.letGo(i);
    }
  }
}
