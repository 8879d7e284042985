// SHA-256 of many pages in one call, sixteen at a time on AVX-512
// (native/sha256-pages.c): about twice what the CPU's SHA extensions hash
// a page at a time. The shared object is built by the Makefile and
// embedded in dist/sgm; Bun loads it from there through bun:ffi.
//
// It is used only where it gives, on this CPU, the digests Bun.SHA256
// gives: checked once per thread on pages whose digests differ in every
// lane. Anywhere else, where the CPU lacks AVX-512, or with
// SGM_NATIVE_DIGEST=0, the caller hashes with Bun.SHA256.

import { dlopen } from "bun:ffi";
import library from "../../native/sha256-pages.so" with { type: "file" };

const PAGE = 4096;

/** Digests of `count` pages, page n at bytes[offsets[n] ..], to digests[32 n ..]; the caller checks the ranges. */
export type HashPagesAt = (bytes: Uint8Array, offsets: Uint32Array, count: number, digests: Uint8Array) => void;

function load(): HashPagesAt | null {
  // for measuring what it saves, against Bun.SHA256 a page at a time
  if (process.env.SGM_NATIVE_DIGEST === "0") return null;
  let native: (bytes: Uint8Array, offsets: Uint32Array, count: number, digests: Uint8Array) => number;
  try {
    native = dlopen(library, { sgm_sha256_pages_at: { args: ["ptr", "ptr", "u32", "ptr"], returns: "i32" } }).symbols.sgm_sha256_pages_at;
  } catch {
    return null;
  }
  const hash: HashPagesAt = (bytes, offsets, count, digests) => {
    if (native(bytes, offsets, count, digests) !== 0) throw new Error("no AVX-512");
  };
  // 17 pages, so a second round of lanes hashes one page beside fifteen spares,
  // out of order and at offsets that are not the page size's, in a view
  // that does not start its buffer
  const count = 17;
  const bytes = new Uint8Array(4 + count * (PAGE + 36));
  for (let i = 0; i < bytes.length; i++) bytes[i] = Math.imul(i + 1, 2654435761) >>> 24;
  const view = bytes.subarray(4);
  const offsets = Uint32Array.from({ length: count }, (_, n) => ((n * 7) % count) * (PAGE + 36) + (n % 3));
  const got = new Uint8Array(count * 32);
  try {
    hash(view, offsets, count, got);
  } catch {
    return null;
  }
  const want = new Uint8Array(32);
  for (let n = 0; n < count; n++) {
    Bun.SHA256.hash(view.subarray(offsets[n]!, offsets[n]! + PAGE), want);
    for (let k = 0; k < 32; k++) if (got[n * 32 + k] !== want[k]) return null;
  }
  return hash;
}

/** The native batch digest, or null where it does not run or does not agree with Bun.SHA256. */
export const nativeHashPagesAt: HashPagesAt | null = load();
