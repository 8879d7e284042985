// After the switchover, pages whose content comes from relays go to QEMU no
// faster than QEMU reads them: one the destination asks for goes at once,
// the rest wait their turn while more than POSTCOPY_HIGH is queued, keeping
// their content here as owed. The stream towards QEMU is a stand-in whose
// reading the test turns on and off: QEMU's pace is what is under test.

import { describe, expect, test } from "bun:test";
import { digestPage, PAGE_BYTES } from "../core/dedup/digest.ts";
import { ContentDirectory } from "../core/gather/content-directory.ts";
import { newFeedStats } from "../core/gather/feed-stats.ts";
import { PageTable } from "../core/gather/page-table.ts";
import { PageWaits } from "../core/gather/page-waits.ts";
import { POSTCOPY_HIGH, PostcopyDelivery } from "../core/gather/postcopy-delivery.ts";

const PAGES = 1024;
const RELAY = 1;

/** The destination's end of the stream: it reads everything queued, or nothing. */
class QemuStream {
  queuedBytes = 0;
  reading = false;
  private waiters: Array<{ limit: number; resolve: () => void }> = [];

  whenWritable(limit: number): Promise<void> {
    if (this.reading) this.queuedBytes = 0;
    if (this.queuedBytes <= limit) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ limit, resolve }));
  }

  startReading(): void {
    this.reading = true;
    this.queuedBytes = 0;
    for (const w of this.waiters.splice(0)) w.resolve();
  }
}

function pageBytes(i: number): Uint8Array {
  const page = new Uint8Array(PAGE_BYTES);
  new DataView(page.buffer).setUint32(0, i + 1);
  return page;
}

function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: Timer | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`within ${ms} ms: ${what}`)), ms)));
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function setUp() {
  const table = new PageTable([{ name: "pc.ram", usedLength: PAGES * PAGE_BYTES }]);
  const dir = new ContentDirectory(() => {});
  const waits = new PageWaits(PAGES);
  const qemu = new QemuStream();
  const stats = newFeedStats();
  const digest = new Uint8Array(32);
  const cids: number[] = [];
  for (let i = 0; i < PAGES; i++) {
    // every page's content is on the relay only, and owed to the destination
    digestPage(pageBytes(i), digest);
    const cid = dir.intern(digest, 0);
    dir.locate(cid, RELAY);
    dir.need(cid);
    table.content[i] = cid;
    cids.push(cid);
  }
  const writes = new Uint8Array(PAGES);
  const fetches: Array<{ cid: number; urgent: boolean }> = [];
  let progressed: () => void = () => {};
  const delivery = new PostcopyDelivery({
    table,
    dir,
    waits,
    writer: { flush() {} },
    sock: qemu,
    stats,
    bandwidth: 1e15,
    fetch: (cid, urgent) => fetches.push({ cid, urgent }),
    fromSource: () => {
      throw new Error("no page is still at the source here");
    },
    deliver: (i) => {
      // as the feed does: the page's bytes go into the stream, and it owes them no more
      table.delivered[i] = 1;
      writes[i]!++;
      if (!qemu.reading) qemu.queuedBytes += PAGE_BYTES;
      dir.unneed(table.content[i]!);
    },
    active: () => true,
    progressed: () => progressed(),
    fail: (err) => {
      throw err;
    },
  });
  dir.onLocal((cid) => waits.wake(cid, (i) => delivery.arrived(i)));
  /** The relay answers for page i's content. */
  const answer = (i: number) => dir.fetched(cids[i]!, pageBytes(i));
  const delivered = () => writes.reduce((n, w) => n + w, 0);
  const whenAllDelivered = () =>
    new Promise<void>((resolve) => {
      progressed = () => {
        // at least: a page written twice must fail the checks after, not hang here
        if (delivered() >= PAGES && delivery.idle) resolve();
      };
      progressed();
    });
  return { table, dir, qemu, delivery, fetches, writes, answer, delivered, whenAllDelivered, cids };
}

describe("PostcopyDelivery", () => {
  test("relay replies wait for a QEMU that does not read; a requested page does not", async () => {
    const s = setUp();
    s.delivery.start();
    // nothing is here: every page waits on the relay, fetched in the background
    expect(s.fetches.length).toBe(PAGES);
    expect(s.fetches.every((f) => !f.urgent)).toBe(true);
    expect(s.delivered()).toBe(0);

    // the relay answers for 900 pages while QEMU reads nothing
    for (let i = 0; i < 900; i++) s.answer(i);
    const bound = POSTCOPY_HIGH / PAGE_BYTES + 2;
    expect(s.delivered()).toBeGreaterThan(0);
    expect(s.delivered()).toBeLessThanOrEqual(bound);
    // what waits for QEMU is held here, counted as owed (the fetch-ahead bound sees it)
    expect(s.dir.owedBytes).toBe((900 - s.delivered()) * PAGE_BYTES);

    // the destination asks for a page whose content is still on the relay
    const before = s.delivered();
    s.delivery.request(0, 1000, 1);
    expect(s.fetches.at(-1)).toEqual({ cid: s.cids[1000]!, urgent: true });
    expect(s.writes[1000]).toBe(0);
    s.answer(1000);
    expect(s.writes[1000]).toBe(1);
    expect(s.delivered()).toBe(before + 1);

    // QEMU reads again: the queued pages go, then the rest as they come
    s.qemu.startReading();
    for (let i = 900; i < PAGES; i++) if (i !== 1000) s.answer(i);
    await within(s.whenAllDelivered(), 4_000, `every page delivered (${s.delivered()} of ${PAGES})`);
    expect(s.writes.every((w) => w === 1)).toBe(true);
    expect(s.dir.owedBytes).toBe(0);
    expect(s.delivery.idle).toBe(true);
  });

  test("a page asked for again while it waits in the queue is written once", async () => {
    const s = setUp();
    s.delivery.start();
    for (let i = 0; i < 600; i++) s.answer(i);
    const queued = s.table.delivered.indexOf(0);
    expect(queued).toBeLessThan(600);
    // its content is here: the request writes it at once, and the queue skips it later
    s.delivery.request(0, queued, 1);
    expect(s.writes[queued]).toBe(1);
    s.qemu.startReading();
    for (let i = 600; i < PAGES; i++) s.answer(i);
    await within(s.whenAllDelivered(), 4_000, `every page delivered (${s.delivered()} of ${PAGES})`);
    expect(s.writes.every((w) => w === 1)).toBe(true);
  });
});
