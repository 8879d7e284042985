// Memory for pages held in bulk (the slabs of page stores), backed by 2 MiB
// pages where the kernel gives them on request (transparent huge pages in
// madvise mode, as Debian ships). The first touch of a 4 KiB page cost
// ~15 us on the machines sgm is tested on: 3.9 s for every GiB a relay or
// gather fills. Advised huge, 256 MiB filled in 0.03 s instead of 1.0 s.

import { dlopen, FFIType, ptr } from "bun:ffi";
import { readFileSync } from "node:fs";

const HUGE_PAGE = 2 * 1024 * 1024;
const SMALL_PAGE = 4096;
const MADV_DONTNEED = 4;
const MADV_HUGEPAGE = 14;
const MADV_POPULATE_WRITE = 23;

type Madvise = (address: ReturnType<typeof ptr>, length: number, advice: number) => number;
let madvise: Madvise | null | undefined;

function loadMadvise(): Madvise | null {
  if (process.platform !== "linux") return null;
  try {
    const libc = dlopen("libc.so.6", { madvise: { args: [FFIType.ptr, FFIType.u64, FFIType.i32], returns: FFIType.i32 } });
    return libc.symbols.madvise as Madvise;
  } catch {
    return null; // no libc to call: plain pages, just slower
  }
}

/** A zeroed slab of `bytes`; in huge pages when `bytes` is a multiple of 2 MiB and the system allows. */
export function allocateSlab(bytes: number): Uint8Array {
  if (bytes % HUGE_PAGE !== 0) return new Uint8Array(bytes);
  madvise ??= loadMadvise();
  if (!madvise) return new Uint8Array(bytes);
  // huge pages need 2 MiB-aligned ranges, and the advice must come before the first touch
  const raw = new Uint8Array(bytes + HUGE_PAGE);
  const skip = (HUGE_PAGE - (Number(ptr(raw)) % HUGE_PAGE)) % HUGE_PAGE;
  const slab = raw.subarray(skip, skip + bytes);
  madvise(ptr(slab), bytes, MADV_HUGEPAGE);
  // The 2 MiB around the slab is never used, but sgm's allocator reuses
  // freed memory (cli/runtime-settings.ts), so it came resident and zeroed: 50% on
  // top of every 4 MiB slab (the gather of a 1 GiB VM through relays kept
  // 36 MiB so). Dropped here; nothing reads it, and zero it stays.
  dropPages(madvise, raw, 0, skip);
  dropPages(madvise, raw, skip + bytes, raw.length);
  return slab;
}

/**
 * A slab as allocateSlab gives it, resident from now on: a store filled
 * later takes no page fault, nor the zeroing of fresh memory, on the way.
 */
export function allocateResidentSlab(bytes: number): Uint8Array {
  const slab = allocateSlab(bytes);
  // one call where the kernel can (Linux 5.14 on); a write to every page where it cannot
  if (!madvise || madvise(ptr(slab), bytes, MADV_POPULATE_WRITE) !== 0) {
    for (let at = 0; at < bytes; at += SMALL_PAGE) slab[at] = 0;
  }
  return slab;
}

/** Gives the whole small pages within raw[from, to) back to the kernel. */
function dropPages(advise: Madvise, raw: Uint8Array, from: number, to: number): void {
  const base = Number(ptr(raw));
  const start = Math.ceil((base + from) / SMALL_PAGE) * SMALL_PAGE - base;
  const end = Math.floor((base + to) / SMALL_PAGE) * SMALL_PAGE - base;
  if (end > start) advise(ptr(raw, start), end - start, MADV_DONTNEED);
}

/** What the kernel says could still be allocated without swapping (MemAvailable); null where it does not say. */
export function availableMemoryBytes(): number | null {
  try {
    const kib = readFileSync("/proc/meminfo", "utf8").match(/^MemAvailable:\s+(\d+) kB$/m)?.[1];
    return kib === undefined ? null : Number(kib) * 1024;
  } catch {
    return null;
  }
}
