// The page digest, BLAKE3, from native/page-digest.c: sixteen pages at a
// time on AVX-512, eight on AVX2, else one page's four chunks side by side. The shared
// object is built by the Makefile and embedded in dist/sgm; Bun loads it
// from there through bun:ffi.
//
// Checked once per thread before use: the one-page kernel against two
// digests BLAKE3 gives (blake3-wasm gave them; test/dedup.test.ts checks
// every kernel against it on random pages), the many-page kernel against
// the one-page kernel. A many-page kernel that disagrees is not used; a
// one-page kernel that does fails the process, as no other digest could
// take its place.

import library from "../../native/page-digest.so" with { type: "file" };
import { openLibrary } from "../native-library.ts";
import { SgmError } from "../errors.ts";

const PAGE = 4096;

/** Digests of `count` pages, page n at bytes[offsets[n] ..], to digests[32 n ..]; the caller checks the ranges. */
export type HashPagesAt = (bytes: Uint8Array, offsets: Uint32Array, count: number, digests: Uint8Array) => void;

const hashArgs = { args: ["ptr", "ptr", "u32", "ptr"], returns: "void" } as const;

function open() {
  try {
    return openLibrary(library, {
      sgm_digest_page: { args: ["ptr", "ptr"], returns: "void" },
      sgm_digest_pages_at: hashArgs,
      sgm_digest_pages_at_shared: hashArgs,
      sgm_digest_narrow: { args: [], returns: "void" },
      sgm_digest_at_most_eight: { args: [], returns: "void" },
      sgm_digest_lanes: { args: [], returns: "i32" },
      sgm_hash_helpers: { args: ["i32"], returns: "i32" },
      sgm_hash_helper_pages: { args: [], returns: "u64" },
    }).symbols;
  } catch (err) {
    throw new SgmError("unavailable", `cannot load the page digest (native/page-digest.c): ${(err as Error).message}`);
  }
}

const native = open();

/** The digest of the 4 KiB page at page[0 ..] to out[0 .. 32); the caller checks the ranges. */
export const hashPage: (page: Uint8Array, out: Uint8Array) => void = native.sgm_digest_page;

// BLAKE3 of a zero page, and of the page whose byte i is i % 251 (as
// BLAKE3's own test vectors fill their inputs)
const KNOWN = [
  { fill: (_: number) => 0, hex: "b6fb73fc46938c981e2b0b4b1ef282adcfc89854d01bfe3972fdc4785b41b2c7" },
  { fill: (i: number) => i % 251, hex: "015094013f57a5277b59d8475c0501042c0b642e531b0a1c8f58d2163229e969" },
];

function hex(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length).toString("hex");
}

function checkPageKernel(): void {
  const out = new Uint8Array(32);
  for (const { fill, hex: want } of KNOWN) {
    // at an offset that is not the page size's
    const bytes = new Uint8Array(PAGE + 3);
    for (let i = 0; i < PAGE; i++) bytes[3 + i] = fill(i);
    hashPage(bytes.subarray(3), out);
    if (hex(out) !== want) throw new SgmError("internal", `the page digest (native/page-digest.c) gives ${hex(out)} where BLAKE3 gives ${want}`);
  }
}

/** `hash` agrees with hashPage on `count` pages (one more than a multiple of 16, so the last lanes hash one page beside spares). */
function agrees(hash: HashPagesAt, count: number): boolean {
  // out of order and at offsets that are not the page size's, in a view that does not start its buffer
  const bytes = new Uint8Array(4 + count * (PAGE + 36));
  for (let i = 0; i < bytes.length; i++) bytes[i] = Math.imul(i + 1, 2654435761) >>> 24;
  const view = bytes.subarray(4);
  const offsets = Uint32Array.from({ length: count }, (_, n) => ((n * 7) % count) * (PAGE + 36) + (n % 3));
  const got = new Uint8Array(count * 32);
  hash(view, offsets, count, got);
  const want = new Uint8Array(32);
  for (let n = 0; n < count; n++) {
    hashPage(view.subarray(offsets[n]!, offsets[n]! + PAGE), want);
    for (let k = 0; k < 32; k++) if (got[n * 32 + k] !== want[k]) return false;
  }
  return true;
}

// for measuring what the wider kernels save, and to test the narrower ones where the CPU has wider:
// 0, the kernel any x86-64 runs, a page at a time; 8, AVX2's eight pages at a time at most
const narrowed = process.env.SGM_NATIVE_DIGEST;
if (narrowed === "0") native.sgm_digest_narrow();
else if (narrowed === "8") native.sgm_digest_at_most_eight();
else if (narrowed !== undefined) throw new SgmError("usage", `SGM_NATIVE_DIGEST=${narrowed}: 0 (a page at a time) or 8 (eight at most), or unset`);
checkPageKernel();
if (!agrees(native.sgm_digest_pages_at, 17)) {
  native.sgm_digest_narrow();
  checkPageKernel();
}

/** Pages the digest hashes side by side on this CPU: 16 (AVX-512), 8 (AVX2), or 1. */
export const digestLanes: number = native.sgm_digest_lanes();

/** The batch digest; it splits each call with the hash helpers once they run (startHashHelpers). */
export let hashPagesAt: HashPagesAt = native.sgm_digest_pages_at;

/**
 * Starts helper threads, up to `wanted` in this process, that hash beside
 * the thread calling hashPagesAt from then on, each call's pages split
 * between them in groups of sixteen (native/page-digest.c). Returns how
 * many run.
 */
export function startHashHelpers(wanted: number): number {
  if (wanted <= 0) return 0;
  const running = native.sgm_hash_helpers(wanted);
  if (running === 0) return 0;
  // checked as the digest alone was, a call of 65 pages (five groups: the
  // caller may well hash them all itself, helpers just started; the stress
  // test in test/dedup.test.ts checks what they hash)
  if (!agrees(native.sgm_digest_pages_at_shared, 65)) return 0;
  hashPagesAt = native.sgm_digest_pages_at_shared;
  return running;
}

/** Pages the hash helpers have hashed in this process. */
export function pagesHashedByHelpers(): number {
  return Number(native.sgm_hash_helper_pages());
}
