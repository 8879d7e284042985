// The gather's precopy feed: the pages of the frames being read go to QEMU
// together, once those frames are applied, each with its newest content,
// and none once switchover has begun.

import { describe, expect, test } from "bun:test";
import type { ContentDirectory } from "../core/gather/content-directory.ts";
import { newFeedStats } from "../core/gather/feed-stats.ts";
import { PageTable } from "../core/gather/page-table.ts";
import { PageWaits } from "../core/gather/page-waits.ts";
import { PrecopyFeed } from "../core/gather/precopy-feed.ts";

function precopy(pages: number) {
  const table = new PageTable([{ name: "pc.ram", usedLength: pages * 4096 }]);
  const writes: Array<[page: number, content: number]> = [];
  const flushes: number[] = [];
  let active = true;
  const feed = new PrecopyFeed({
    table,
    // every content is here: the pump asks nothing more of the directory
    dir: { isLocal: () => true } as unknown as ContentDirectory,
    writer: { flush: () => void flushes.push(writes.length) },
    sock: { queuedBytes: 0, whenWritable: () => Promise.resolve() },
    stats: newFeedStats(),
    waits: new PageWaits(table.total),
    fetch: () => {
      throw new Error("no content is on a relay here");
    },
    active: () => active,
    fail: (err) => {
      throw err;
    },
    withholds: () => false,
    write: (i, c) => void writes.push([i, c]),
  });
  const map = (i: number, c: number) => {
    table.content[i] = c;
    feed.enqueue(i);
  };
  return { table, feed, writes, flushes, map, switchover: () => (active = false) };
}

describe("precopy feed", () => {
  test("the pages of a frame go to QEMU after it, in one flush, not one each", async () => {
    const p = precopy(64);
    for (let i = 0; i < 64; i++) p.map(i, 1000 + i);
    expect(p.writes).toEqual([]);
    await p.feed.stopped;
    expect(p.writes).toEqual(Array.from({ length: 64 }, (_, i) => [i, 1000 + i]));
    expect(p.flushes).toEqual([64]);
    expect(Array.from(p.table.fed)).toEqual(Array.from(p.table.content));
  });

  test("a page whose content changes before the pump runs is written once, with the newest", async () => {
    const p = precopy(4);
    p.map(2, 7);
    p.map(2, 8);
    p.map(3, 9);
    await p.feed.stopped;
    expect(p.writes).toEqual([
      [2, 8],
      [3, 9],
    ]);
    // a later frame starts the pump again
    p.map(2, 10);
    await p.feed.stopped;
    expect(p.writes.at(-1)).toEqual([2, 10]);
    expect(p.flushes).toEqual([2, 3]);
  });

  test("switchover begun before the pump runs: nothing is written, and the pages stay unfed for after it", async () => {
    const p = precopy(8);
    for (let i = 0; i < 8; i++) p.map(i, i + 1);
    p.switchover();
    await p.feed.stopped;
    expect(p.writes).toEqual([]);
    expect(Array.from(p.table.fed).some((c, i) => c === p.table.content[i])).toBe(false);
  });
});
