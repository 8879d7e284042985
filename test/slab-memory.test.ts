// Page slabs cost their own pages in memory and no more, in a process whose
// allocator keeps freed memory for reuse as sgm's does (cli/runtime-settings.ts):
// the 2 MiB a slab is aligned within must not stay resident beside it.

import { describe, expect, test } from "bun:test";
import { join } from "node:path";

const SLAB_MEMORY = join(import.meta.dir, "..", "core", "dedup", "slab-memory.ts");

// Churns memory as socket reads do, so the allocator has resident memory to
// hand out again, then counts (mincore) what is resident of 16 slabs' own
// pages and of the rest of their allocations.
const PROBE = `
import { dlopen, FFIType, ptr } from "bun:ffi";
import { allocateSlab } from ${JSON.stringify(SLAB_MEMORY)};
const libc = dlopen("libc.so.6", { mincore: { args: [FFIType.u64, FFIType.u64, FFIType.ptr], returns: FFIType.i32 } });
const PAGE = 4096;
function residentKiB(from, to) {
  const start = Math.floor(from / PAGE) * PAGE;
  const pages = Math.ceil((to - start) / PAGE);
  if (pages <= 0) return 0;
  const vec = new Uint8Array(pages);
  if (libc.symbols.mincore(start, pages * PAGE, ptr(vec)) !== 0) throw new Error("mincore failed");
  return vec.reduce((n, v) => n + (v & 1), 0) * 4;
}
let junk = [];
for (let i = 0; i < 600; i++) { const b = new Uint8Array(1 << 20); b.fill(1); junk.push(b); if (junk.length > 100) junk.shift(); }
junk = [];
Bun.gc(true);
let own = 0, around = 0;
const kept = [];
for (let i = 0; i < 16; i++) {
  const slab = allocateSlab(4 << 20);
  slab.fill(7);
  kept.push(slab);
  const raw = Number(ptr(slab.buffer)), at = Number(ptr(slab)), end = raw + slab.buffer.byteLength;
  own += residentKiB(at, at + slab.length);
  // whole pages only: the allocation's first and last may share a page with another
  around += residentKiB(Math.ceil(raw / PAGE) * PAGE, at) + residentKiB(at + slab.length, Math.floor(end / PAGE) * PAGE);
}
console.log(JSON.stringify({ own, around }));
`;

describe("page slabs", () => {
  test("only a slab's own pages stay resident, where freed memory is reused", () => {
    const run = Bun.spawnSync([process.execPath, "-e", PROBE], { env: { ...process.env, MIMALLOC_PURGE_DELAY: "-1" }, timeout: 60_000 });
    expect(run.stderr.toString()).toBe("");
    const { own, around } = JSON.parse(run.stdout.toString()) as { own: number; around: number };
    expect(own).toBe(16 * 4096);
    expect(around).toBe(0);
  });
});
