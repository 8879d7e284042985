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

type NativeHash = (bytes: Uint8Array, offsets: Uint32Array, count: number, digests: Uint8Array) => number;

interface Native {
  alone: NativeHash;
  shared: NativeHash;
  startHelpers: (wanted: number) => number;
  helperPages: () => number | bigint;
}

function open(): Native | null {
  // for measuring what it saves, against Bun.SHA256 a page at a time
  if (process.env.SGM_NATIVE_DIGEST === "0") return null;
  try {
    const hash = { args: ["ptr", "ptr", "u32", "ptr"], returns: "i32" } as const;
    const { symbols } = dlopen(library, {
      sgm_sha256_pages_at: hash,
      sgm_sha256_pages_at_shared: hash,
      sgm_hash_helpers: { args: ["i32"], returns: "i32" },
      sgm_hash_helper_pages: { args: [], returns: "u64" },
    });
    return { alone: symbols.sgm_sha256_pages_at, shared: symbols.sgm_sha256_pages_at_shared, startHelpers: symbols.sgm_hash_helpers, helperPages: symbols.sgm_hash_helper_pages };
  } catch {
    return null;
  }
}

const native = open();

/** `native` as a HashPagesAt, if it gives Bun.SHA256's digests on this CPU. */
function checked(native: NativeHash, count: number): HashPagesAt | null {
  const hash: HashPagesAt = (bytes, offsets, pages, digests) => {
    if (native(bytes, offsets, pages, digests) !== 0) throw new Error("no AVX-512");
  };
  // `count` pages (one more than a multiple of 16), so the last round of
  // lanes hashes one page beside fifteen spares, out of order and at offsets
  // that are not the page size's, in a view that does not start its buffer
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
export let nativeHashPagesAt: HashPagesAt | null = native && checked(native.alone, 17);

/**
 * Starts helper threads, up to `wanted` in this process, that hash beside
 * the thread calling nativeHashPagesAt from then on, each call's pages
 * split between them (native/sha256-pages.c). Returns how many run: 0 where
 * the native digest does not.
 */
export function startHashHelpers(wanted: number): number {
  if (!native || !nativeHashPagesAt || wanted <= 0) return 0;
  const running = native.startHelpers(wanted);
  if (running === 0) return 0;
  // checked as the digest alone was, a call of 65 pages (five groups: the
  // caller may well hash them all itself, helpers just started; the stress
  // test in test/dedup.test.ts checks what they hash)
  const shared = checked(native.shared, 65);
  if (shared) nativeHashPagesAt = shared;
  return shared ? running : 0;
}

/** Pages the hash helpers have hashed in this process. */
export function pagesHashedByHelpers(): number {
  return native ? Number(native.helperPages()) : 0;
}
