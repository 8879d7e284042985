// Faults a test can inject into a running sgm, to prove that the checks
// meant to catch them do. SGM_TEST_FAULT names one; nothing else reads it.
//   scatter-map      scatter's final page map names a wrong digest for one page
//   gather-map       the gather's does
//   gather-delivery  the gather leaves one page it owes the destination unwritten
//   gather-withhold  the gather never writes to its destination the pages of
//                    SGM_TEST_FAULT_AT=BLOCK:OFFSET:LENGTH (bytes of that RAM
//                    block), though it holds their content as if it had

// SGM_TEST_SCRIBBLE=1 is a check rather than a fault: bytes received are
// overwritten once handled (a socket read, a frame assembled from several),
// as a buffer used again would overwrite them later, so a view kept past its
// call shows in a test as a wrong page rather than one day in a guest. And
// the gather checks each page it writes to its destination against its
// content's digest (page-writes.ts): a slot that came to hold other bytes
// than its content id names fails the run there, not the guest later.

// SGM_TEST_MAP_DIR=DIR is a check too: the scatter writes each VM's final
// page map there (VM.map: every page's content digest in page order, a zero
// page's for a page never sent; VM.map.json: the RAM blocks), so that a test
// can compare it with the source's final memory. A page QEMU's stream never
// carried at its last content shows there, where sgm's own checks, all
// comparing against that stream, cannot see it.

import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { DIGEST_BYTES } from "./dedup/digest.ts";
import { ZERO_PAGE_DIGEST } from "./dedup/page-map-digest.ts";

export type TestFault = "scatter-map" | "gather-map" | "gather-delivery" | "gather-withhold";

export function injected(which: TestFault): boolean {
  return process.env.SGM_TEST_FAULT === which;
}

/** The pages gather-withhold names: RAM block, first and last page. */
export function withheldPages(): { block: string; first: number; last: number } | null {
  if (!injected("gather-withhold")) return null;
  const m = /^(.+):(\d+):(\d+)$/.exec(process.env.SGM_TEST_FAULT_AT ?? "");
  if (!m) throw new Error("SGM_TEST_FAULT=gather-withhold needs SGM_TEST_FAULT_AT=BLOCK:OFFSET:LENGTH");
  const offset = Number(m[2]);
  return { block: m[1]!, first: Math.floor(offset / 4096), last: Math.floor((offset + Math.max(1, Number(m[3])) - 1) / 4096) };
}

const scribble = process.env.SGM_TEST_SCRIBBLE === "1";

/** Under SGM_TEST_SCRIBBLE, the gather checks the bytes it writes (see the top of this file). */
export const checkWrites = scribble;

/** Under SGM_TEST_SCRIBBLE, overwrites bytes whose handler has returned. */
export function scribbleHandled(bytes: Uint8Array): void {
  if (scribble) bytes.fill(0xa5);
}

const mapDir = process.env.SGM_TEST_MAP_DIR;

/** Under SGM_TEST_MAP_DIR, writes a VM's final page map (see the top of this file). */
export function dumpFinalMap(vmName: string, blocks: ReadonlyArray<{ name: string; pages: number }>, pages: number, writeDigest: (page: number, out: Uint8Array, at: number) => boolean): void {
  if (!mapDir) return;
  const out = new Uint8Array(pages * DIGEST_BYTES);
  for (let i = 0; i < pages; i++) if (!writeDigest(i, out, i * DIGEST_BYTES)) out.set(ZERO_PAGE_DIGEST, i * DIGEST_BYTES);
  writeFileSync(join(mapDir, `${vmName}.map`), out);
  writeFileSync(join(mapDir, `${vmName}.map.json`), JSON.stringify({ blocks }));
}
