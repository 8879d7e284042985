// What the destination must drop at switchover: every page whose fed
// content is stale, or that was never fed (QEMU then reads it as absent and
// asks for it), as runs of pages per block. And a page to give up should
// there be none, because QEMU's listen thread deadlocks without a discard.

import type { ContentDirectory } from "./content-directory.ts";
import { NOT_FED, NOT_WRITTEN, type PageTable, ZERO } from "./page-table.ts";

/** Per block, [first page, count] runs of the pages whose fed content is not their content. */
export function staleRanges(t: PageTable): Array<Array<[number, number]>> {
  return t.blocks.map((_, b) => {
    const ranges: Array<[number, number]> = [];
    const first = t.blockStart[b]!;
    for (let i = first; i < t.blockStart[b + 1]!; i++) {
      if (t.fed[i] === t.content[i]) continue;
      const last = ranges[ranges.length - 1];
      if (last && last[0] + last[1] === i - first) last[1]++;
      else ranges.push([i - first, 1]);
    }
    return ranges;
  });
}

export function countPages(discards: ReadonlyArray<ReadonlyArray<readonly [number, number]>>): number {
  return discards.reduce((sum, ranges) => sum + ranges.reduce((n, [, count]) => n + count, 0), 0);
}

/** A page the destination can be given again: zero, or its content here or on a relay; -1 if none. */
export function pickSpare(t: PageTable, dir: ContentDirectory): number {
  let onRelay = -1;
  for (let i = 0; i < t.total; i++) {
    const c = t.content[i]!;
    if (c === ZERO) return i;
    if (c < 0) continue;
    if (dir.isLocal(c)) return i;
    if (onRelay < 0 && dir.relayMask(c) !== 0) onRelay = i;
  }
  return onRelay;
}

/** Once the discards are sent: pages fed and still current are at the destination for good; the others it holds nothing of. */
export function settleFed(t: PageTable): void {
  for (let i = 0; i < t.total; i++) {
    if (t.fed[i] === t.content[i]) t.delivered[i] = 1;
    else {
      t.written[i] = NOT_WRITTEN;
      t.fed[i] = NOT_FED;
    }
  }
}
