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

/** Digests of `count` pages, page n at pages[n * stride ..], to digests[32 n ..]. */
export type HashPages = (pages: Uint8Array, stride: number, count: number, digests: Uint8Array) => void;

function load(): HashPages | null {
  // for measuring what it saves, against Bun.SHA256 a page at a time
  if (process.env.SGM_NATIVE_DIGEST === "0") return null;
  let native: (pages: Uint8Array, stride: number, count: number, digests: Uint8Array) => number;
  try {
    native = dlopen(library, { sgm_sha256_pages: { args: ["ptr", "u32", "u32", "ptr"], returns: "i32" } }).symbols.sgm_sha256_pages;
  } catch {
    return null;
  }
  const hash: HashPages = (pages, stride, count, digests) => {
    if (native(pages, stride, count, digests) !== 0) throw new Error("no AVX-512");
  };
  // 17 pages, so a second round of lanes hashes one page beside fifteen spares,
  // at a stride and an offset that are not the page size
  const count = 17;
  const stride = PAGE + 36;
  const pages = new Uint8Array(4 + count * stride);
  for (let i = 0; i < pages.length; i++) pages[i] = Math.imul(i + 1, 2654435761) >>> 24;
  const view = pages.subarray(4);
  const got = new Uint8Array(count * 32);
  try {
    hash(view, stride, count, got);
  } catch {
    return null;
  }
  const want = new Uint8Array(32);
  for (let n = 0; n < count; n++) {
    Bun.SHA256.hash(view.subarray(n * stride, n * stride + PAGE), want);
    for (let k = 0; k < 32; k++) if (got[n * 32 + k] !== want[k]) return null;
  }
  return hash;
}

/** The native batch digest, or null where it does not run or does not agree with Bun.SHA256. */
export const nativeHashPages: HashPages | null = load();
