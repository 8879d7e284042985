// Page digests: the content address under which identical pages from any VM
// are stored and sent once.
//
// BLAKE3, natively (native-digest.ts): sixteen pages at a time at 6.3 to
// 7.2 GB/s a core here, against 3.5 to 3.7 for SHA-256 the same way and 1.6
// for Bun.SHA256 a page at a time (README, Choices). At a 2 GB/s stream the
// digest is the hot path, and a 32-byte collision-resistant digest lets us
// trust a digest match without comparing pages.

import { Buffer } from "node:buffer";
import { SgmError } from "../errors.ts";
import { digestLanes, hashPage, hashPagesAt } from "./native-digest.ts";

export const DIGEST_BYTES = 32;
export const PAGE_BYTES = 4096;

const scratch = new Uint8Array(DIGEST_BYTES);

/**
 * Writes the digest of the 4 KiB `page` (at any byteOffset) into
 * out[outOffset .. outOffset + 32). Allocates nothing.
 */
export function digestPage(page: Uint8Array, out: Uint8Array, outOffset = 0): void {
  if (page.length !== PAGE_BYTES) throw new SgmError("internal", `digest of ${page.length} bytes, not a ${PAGE_BYTES}-byte page`);
  if (outOffset < 0 || outOffset + DIGEST_BYTES > out.length) {
    throw new SgmError("internal", `digest output needs ${DIGEST_BYTES} bytes at offset ${outOffset} of ${out.length}`);
  }
  if (outOffset === 0) {
    hashPage(page, out);
    return;
  }
  // native code writes where the pointer it is given starts: a view at the
  // offset would be an object per page, so the digest goes through a scratch copy
  hashPage(page, scratch);
  for (let k = 0; k < DIGEST_BYTES; k++) out[outOffset + k] = scratch[k]!;
}

/** Whether digestPages hashes many pages side by side (AVX-512 or AVX2) on this CPU. */
export const batchDigestNative = digestLanes > 1;

let strided = new Uint32Array(0);

/**
 * Writes the digests of `count` 4 KiB pages, page n at pages[n * stride ..],
 * to digests[32 n ..]: many side by side where the CPU allows.
 */
export function digestPages(pages: Uint8Array, stride: number, count: number, digests: Uint8Array): void {
  if (!(Number.isInteger(count) && count >= 0 && Number.isInteger(stride) && stride >= PAGE_BYTES)) {
    throw new SgmError("internal", `digest of ${count} pages at a stride of ${stride}`);
  }
  if (count > 0 && (count - 1) * stride + PAGE_BYTES > pages.length) {
    throw new SgmError("internal", `digest of ${count} pages at a stride of ${stride} from ${pages.length} bytes`);
  }
  // the offsets are 32-bit: one past them would wrap round to another page
  if (count > 0 && (count - 1) * stride >= 2 ** 32) throw new SgmError("internal", `digest of ${count} pages at a stride of ${stride}: past 4 GiB`);
  if (strided.length < count) strided = new Uint32Array(Math.max(count, 2 * strided.length));
  for (let n = 0; n < count; n++) strided[n] = n * stride;
  digestPagesAt(pages, strided, count, digests);
}

/**
 * Writes the digests of `count` 4 KiB pages, page n at bytes[offsets[n] ..],
 * to digests[32 n ..], as digestPages does.
 */
export function digestPagesAt(bytes: Uint8Array, offsets: Uint32Array, count: number, digests: Uint8Array): void {
  if (count === 0) return;
  // native code reads and writes exactly where these say: never past the views
  if (!(Number.isInteger(count) && count > 0 && count <= offsets.length && count * DIGEST_BYTES <= digests.length)) {
    throw new SgmError("internal", `digest of ${count} pages with ${offsets.length} offsets into ${digests.length} bytes`);
  }
  for (let n = 0; n < count; n++) {
    if (offsets[n]! + PAGE_BYTES > bytes.length) throw new SgmError("internal", `page ${n} of a digest at ${offsets[n]}, past the ${bytes.length} bytes given`);
  }
  hashPagesAt(bytes, offsets, count, digests);
}

/** Whether the 32-byte digests at a[aAt ..] and b[bAt ..] are the same. */
export function sameDigest(a: Uint8Array, aAt: number, b: Uint8Array, bAt: number): boolean {
  for (let i = 0; i < DIGEST_BYTES; i++) if (a[aAt + i] !== b[bAt + i]) return false;
  return true;
}

// Compared against with Buffer.equals, which is a native memcmp: it needs no
// alignment, so pages at any byteOffset work, and on 64 MiB of pages it ran
// at ~10 GB/s against ~4 GB/s for the best JS word loop (Uint32Array with OR
// accumulation) and 0.8 GB/s for BigUint64Array. Float64Array word compares
// would be wrong anyway: a page holding 0x8000000000000000 reads as -0 === 0.
const ZERO_PAGE = Buffer.alloc(PAGE_BYTES);

/** True when every byte of `page` is zero; `page` may be any length and at any byteOffset. */
export function isZeroPage(page: Uint8Array): boolean {
  if (page.length === PAGE_BYTES) return ZERO_PAGE.equals(page);
  for (let start = 0; start < page.length; start += PAGE_BYTES) {
    const chunk = page.subarray(start, Math.min(start + PAGE_BYTES, page.length));
    if (!ZERO_PAGE.subarray(0, chunk.length).equals(chunk)) return false;
  }
  return true;
}

// Buffer's copy takes offsets, so a page is copied without a view of it:
// 0.43 us a page against 0.70 us (and a view for the collector) for
// target.set(source.subarray(...)) under Bun, and up to 3 us while views pile up.
const copy = Buffer.prototype.copy;

/** Copies source[sourceAt .. sourceAt + length) to target[targetAt ..); both may be any Uint8Array. */
export function copyBytes(source: Uint8Array, sourceAt: number, target: Uint8Array, targetAt: number, length: number): void {
  if (sourceAt < 0 || targetAt < 0 || sourceAt + length > source.length || targetAt + length > target.length) {
    throw new SgmError("internal", `copy of ${length} bytes from ${sourceAt} of ${source.length} to ${targetAt} of ${target.length}`);
  }
  copy.call(source, target, targetAt, sourceAt, sourceAt + length);
}

/** The digest at d[offset .. offset + 32) as lowercase hex, for messages and tests. */
export function digestHex(d: Uint8Array, offset = 0): string {
  if (offset < 0 || offset + DIGEST_BYTES > d.length) {
    throw new SgmError("internal", `no ${DIGEST_BYTES}-byte digest at offset ${offset} of ${d.length}`);
  }
  return Buffer.from(d.buffer, d.byteOffset + offset, DIGEST_BYTES).toString("hex");
}
