// What the gather holds, counted the way its reading of the scatter needs:
// bytes owed to a destination drain without the scatter, bytes held for a
// pin go only when the scatter's UNPIN is read, so only the first may stop
// the reading (a gather that waited on the second with the scatter unread
// waited for ever). And the scatter's side: unpins that wait for a map
// frame are few, so pinned content stays near the budget.

import { describe, expect, test } from "bun:test";
import { DIGEST_BYTES, PAGE_BYTES, digestHex, digestPage } from "../core/dedup/digest.ts";
import { ContentDirectory } from "../core/gather/content-directory.ts";
import { newFeedStats } from "../core/gather/feed-stats.ts";
import { OwedContent } from "../core/gather/owed-content.ts";
import { PageTable } from "../core/gather/page-table.ts";
import { PageWrites } from "../core/gather/page-writes.ts";
import { GatherPins } from "../core/scatter/gather-pins.ts";

function digest(n: number): Uint8Array {
  const d = new Uint8Array(DIGEST_BYTES);
  new DataView(d.buffer).setUint32(0, n + 1);
  return d;
}

const page = new Uint8Array(PAGE_BYTES).fill(9);

describe("ContentDirectory: bytes owed and bytes pinned", () => {
  test("content the scatter sent and no page needs is held, but owed to nobody", () => {
    const dir = new ContentDirectory(() => {});
    for (let n = 0; n < 10; n++) dir.receive(dir.intern(digest(n), 0), page);
    expect(dir.usedBytes).toBe(10 * PAGE_BYTES);
    expect(dir.owedBytes).toBe(0);
  });

  test("a need makes held content owed; writing it lets go of the debt, the pin keeps the bytes", async () => {
    const dir = new ContentDirectory(() => {});
    const cids = Array.from({ length: 8 }, (_, n) => dir.intern(digest(n), 0));
    for (const cid of cids) dir.receive(cid, page);
    for (const cid of cids) dir.need(cid);
    dir.need(cids[0]!); // two pages with the same content
    expect(dir.owedBytes).toBe(8 * PAGE_BYTES);
    let woke = false;
    const below = dir.whenOwedBelow(1 * PAGE_BYTES).then(() => (woke = true));
    for (const cid of cids) dir.unneed(cid);
    await Promise.resolve();
    expect(woke).toBe(false); // one page still owes content 0
    expect(dir.owedBytes).toBe(PAGE_BYTES);
    dir.unneed(cids[0]!);
    await below;
    expect(dir.owedBytes).toBe(0);
    expect(dir.usedBytes).toBe(8 * PAGE_BYTES); // pinned, no relay holds it: kept
    for (const cid of cids) dir.unpin(cid);
    expect(dir.usedBytes).toBe(0);
  });

  test("a need taken before the bytes arrive is owed from their arrival", () => {
    const dir = new ContentDirectory(() => {});
    const cid = dir.intern(digest(1), 0);
    dir.locate(cid, 1);
    dir.need(cid);
    expect(dir.owedBytes).toBe(0);
    dir.fetched(cid, page);
    expect(dir.owedBytes).toBe(PAGE_BYTES);
    dir.unneed(cid);
    expect(dir.owedBytes).toBe(0);
    expect(dir.usedBytes).toBe(0); // a relay holds it: fetched again if named again
  });
});

describe("ContentDirectory: pages by offset, and what is forgotten", () => {
  test("pages taken at odd offsets of one buffer come back whole, across slabs; each forgotten content names its own digest and relays", () => {
    const count = 1100; // past one slab of 1024 pages
    const pages = new Uint8Array(17 + count * PAGE_BYTES);
    for (let n = 0; n < count; n++) new DataView(pages.buffer).setUint32(17 + n * PAGE_BYTES + 100, n + 1);
    const digests = new Uint8Array(count * DIGEST_BYTES);
    for (let n = 0; n < count; n++) digestPage(pages.subarray(17 + n * PAGE_BYTES, 17 + (n + 1) * PAGE_BYTES), digests, n * DIGEST_BYTES);
    const forgotten: Array<{ cid: number; digest: string; mask: number }> = [];
    const dir: ContentDirectory = new ContentDirectory((cid, mask) => forgotten.push({ cid, digest: digestHex(dir.digestOf(cid)), mask }));
    const cids = Array.from({ length: count }, (_, n) => dir.intern(digests, n * DIGEST_BYTES));
    cids.forEach((cid, n) => {
      if (n % 2) dir.receive(cid, pages, 17 + n * PAGE_BYTES);
      else {
        dir.locate(cid, n % 3);
        dir.need(cid);
        dir.fetched(cid, pages, 17 + n * PAGE_BYTES);
      }
    });
    const check = new Uint8Array(DIGEST_BYTES);
    cids.forEach((cid, n) => {
      const at = dir.offsetOf(cid);
      digestPage(dir.slabOf(cid).subarray(at, at + PAGE_BYTES), check);
      expect(digestHex(check)).toBe(digestHex(digests, n * DIGEST_BYTES));
    });
    dir.unpinAll();
    cids.forEach((cid, n) => n % 2 || dir.unneed(cid));
    expect(forgotten.length).toBe(count);
    for (const f of forgotten) {
      const n = cids.indexOf(f.cid);
      expect(f.digest).toBe(digestHex(digests, n * DIGEST_BYTES));
      expect(f.mask).toBe(n % 2 ? 0 : n % 3);
    }
    expect(dir.usedBytes).toBe(0);
  });
});

describe("OwedContent: a page's need on its content", () => {
  test("a page named again with the content it owes keeps that content, even when its need is the last hold", () => {
    const forgotten: number[] = [];
    const dir = new ContentDirectory((cid) => forgotten.push(cid));
    const owed = new OwedContent(new PageTable([{ name: "pc.ram", usedLength: 4 * PAGE_BYTES }]), dir);
    const cid = dir.intern(digest(1), 0);
    dir.locate(cid, 1);
    owed.setContent(0, cid);
    dir.fetched(cid, page);
    dir.unpinAll(); // the scatter is gone: page 0's need is all that holds the content
    owed.setContent(0, cid);
    expect(forgotten).toEqual([]);
    expect(dir.isLocal(cid)).toBe(true);
    expect(dir.owedBytes).toBe(PAGE_BYTES);
    owed.letGo(0);
    expect(forgotten).toEqual([cid]);
    expect(dir.usedBytes).toBe(0);
  });
});

describe("PageWrites: bytes checked on their way to the destination", () => {
  test("a slot that came to hold other bytes than its content fails the write, before anything is written", () => {
    const table = new PageTable([{ name: "pc.ram", usedLength: 4 * PAGE_BYTES }]);
    const dir = new ContentDirectory(() => {});
    const owed = new OwedContent(table, dir);
    const content = new Uint8Array(PAGE_BYTES).fill(7);
    const d = new Uint8Array(DIGEST_BYTES);
    digestPage(content, d);
    const cid = dir.intern(d, 0);
    dir.receive(cid, content);
    const written: Array<{ page: number; bytes: Uint8Array | null }> = [];
    // stands for the stream to QEMU: records what it is given, copied as the real one copies
    const writer = {
      page: (_b: number, page: number, slab: Uint8Array | null, at = 0) => void written.push({ page, bytes: slab && slab.slice(at, at + PAGE_BYTES) }),
      ping: () => {},
      flush: () => {},
    };
    const writes = new PageWrites({ table, dir, owed, stats: newFeedStats(), writer: () => writer, postcopy: () => false, checkBytes: true });
    for (const i of [0, 1]) owed.setContent(i, cid);
    writes.write(0, cid);
    expect(written).toEqual([{ page: 0, bytes: content }]);
    const slab = dir.slabOf(cid);
    slab[dir.offsetOf(cid) + 100]! ^= 1; // what a slot reused for other content would hold
    expect(() => writes.write(1, cid)).toThrow(`the bytes held for content ${cid} are not that content`);
    expect(written.length).toBe(1);
  });
});

describe("GatherPins: unpins waiting for a map frame", () => {
  test("past the budget every new pin decides an unpin, which waits until takeReady", () => {
    const pins = new GatherPins(16);
    const stream = pins.mapStream();
    for (let cid = 0; cid < 16; cid++) pins.pin(cid);
    expect(pins.undecidedUnpins).toBe(0);
    for (let cid = 16; cid < 20; cid++) {
      pins.pin(cid);
      stream.added++;
    }
    expect(pins.undecidedUnpins).toBe(4);
    // stamped with the map entries written so far: not ready until they are sent
    expect(pins.takeReady()).toEqual([]);
    expect(pins.undecidedUnpins).toBe(0);
    stream.sent = stream.added;
    expect(pins.takeReady()).toEqual([0, 1, 2, 3]);
  });
});
