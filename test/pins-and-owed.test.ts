// What the gather holds, counted the way its reading of the scatter needs:
// bytes owed to a destination drain without the scatter, bytes held for a
// pin go only when the scatter's UNPIN is read, so only the first may stop
// the reading (a gather that waited on the second with the scatter unread
// waited for ever). And the scatter's side: unpins that wait for a map
// frame are few, so pinned content stays near the budget.

import { describe, expect, test } from "bun:test";
import { DIGEST_BYTES, PAGE_BYTES } from "../core/dedup/digest.ts";
import { ContentDirectory } from "../core/gather/content-directory.ts";
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
