// Frames between relays and their clients (scatters put pages, gathers get
// and release them). All binary except the small JSON stats and errors,
// which travel as CONTROL frames (see messages.ts).
//
// RELAY_PUT   run(16) seq(u32) count(u32) count x (digest(32) page(4096))
// RELAY_ACK   seq(u32) count(u32) refused-bitmap(ceil(count/8))   one per PUT, in order
// RELAY_GET   run(16) req(u32) count(u32) count x digest(32)   only pages the run holds are found
// RELAY_PAGES req(u32) count(u32) count x (found(u8) digest(32) [page(4096) if found])
// RELAY_RELEASE run(16) count(u32) count x digest(32)
// RELAY_HAS   run(16) req(u32) count(u32) count x digest(32)   held for the run, or not
// RELAY_HAS_REPLY req(u32) count(u32) held-bitmap(ceil(count/8))
// RELAY_HOLD  run(16) keeper(16) seq(u32) count(u32) count x digest(32)   held for this run too
//             if `keeper` keeps it (another run of the evacuation put it); answered by RELAY_ACK
//             like a PUT, in the same seq order
// RELAY_KEEP  keeper(16) run(16) count(u32) count x digest(32)   what `run` holds, kept for
//             `keeper` while room allows (relay-unkeep drops them); not answered, others skipped
//
// Run and keeper ids are random and known only to the processes of their
// run or evacuation: a peer holding the relay key but not the id can read,
// hold, keep or release nothing of theirs (a digest alone opens nothing).

import { DIGEST_BYTES, PAGE_BYTES, copyBytes } from "../dedup/digest.ts";
import { SgmError } from "../errors.ts";

export const RelayFrame = {
  PUT: 20,
  ACK: 21,
  GET: 22,
  PAGES: 23,
  RELEASE: 24,
  HAS: 25,
  HAS_REPLY: 26,
  HOLD: 27,
  KEEP: 28,
} as const;

export const RUN_ID_BYTES = 16;
/** Pages per PUT (and digests per HOLD), digests per GET/HAS/RELEASE. */
export const PUT_BATCH = 64;
export const GET_BATCH = 256;
export const RELEASE_BATCH = 4096;

export const PUT_ENTRY = DIGEST_BYTES + PAGE_BYTES;

export function relayMaxPayload(type: number): number | undefined {
  switch (type) {
    case RelayFrame.PUT:
      return RUN_ID_BYTES + 8 + PUT_BATCH * PUT_ENTRY;
    case RelayFrame.ACK:
      return 8 + PUT_BATCH / 8;
    case RelayFrame.GET:
    case RelayFrame.HAS:
      return RUN_ID_BYTES + 8 + GET_BATCH * DIGEST_BYTES;
    case RelayFrame.PAGES:
      return 8 + GET_BATCH * (1 + PUT_ENTRY);
    case RelayFrame.RELEASE:
      return RUN_ID_BYTES + 4 + RELEASE_BATCH * DIGEST_BYTES;
    case RelayFrame.HAS_REPLY:
      return 8 + GET_BATCH / 8;
    case RelayFrame.HOLD:
      return 2 * RUN_ID_BYTES + 8 + PUT_BATCH * DIGEST_BYTES;
    case RelayFrame.KEEP:
      return 2 * RUN_ID_BYTES + 4 + PUT_BATCH * DIGEST_BYTES;
    default:
      return undefined;
  }
}

function view(payload: Uint8Array): DataView {
  return new DataView(payload.buffer, payload.byteOffset, payload.length);
}

function bitmap(bits: readonly boolean[]): Uint8Array {
  const out = new Uint8Array(Math.ceil(bits.length / 8));
  bits.forEach((bit, i) => {
    if (bit) out[i >> 3]! |= 1 << (i & 7);
  });
  return out;
}

function readBitmap(bytes: Uint8Array, count: number): boolean[] {
  return Array.from({ length: count }, (_, i) => ((bytes[i >> 3] ?? 0) & (1 << (i & 7))) !== 0);
}

// ---- PUT --------------------------------------------------------------------------

/** Builds PUT payloads in place: the caller copies pages in, then takes the payload. */
export class PutBuilder {
  static readonly BUFFER_BYTES = RUN_ID_BYTES + 8 + PUT_BATCH * PUT_ENTRY;
  private buf: Uint8Array;
  private count = 0;

  constructor(buf: Uint8Array = new Uint8Array(PutBuilder.BUFFER_BYTES)) {
    this.buf = buf;
  }

  get pages(): number {
    return this.count;
  }

  get full(): boolean {
    return this.count >= PUT_BATCH;
  }

  /** Copies digest and page in. */
  add(digest: Uint8Array, digestAt: number, page: Uint8Array): void {
    const at = RUN_ID_BYTES + 8 + this.count * PUT_ENTRY;
    copyBytes(digest, digestAt, this.buf, at, DIGEST_BYTES);
    this.buf.set(page, at + DIGEST_BYTES);
    this.count++;
  }

  /** The payload (a view of the builder's buffer) and that buffer; the builder moves to `next`. */
  take(run: Uint8Array, seq: number, next: Uint8Array): { payload: Uint8Array; buffer: Uint8Array } {
    const buffer = this.buf;
    buffer.set(run, 0);
    const dv = view(buffer);
    dv.setUint32(RUN_ID_BYTES, seq);
    dv.setUint32(RUN_ID_BYTES + 4, this.count);
    const payload = buffer.subarray(0, RUN_ID_BYTES + 8 + this.count * PUT_ENTRY);
    this.buf = next;
    this.count = 0;
    return { payload, buffer };
  }
}

export interface PutFrame {
  run: Uint8Array;
  seq: number;
  count: number;
  /** Offsets of entry n's digest and page in the payload. */
  digestAt(n: number): number;
  pageAt(n: number): number;
}

export function readPut(payload: Uint8Array): PutFrame {
  if (payload.length < RUN_ID_BYTES + 8) throw new SgmError("data", "relay PUT shorter than its header");
  const dv = view(payload);
  const count = dv.getUint32(RUN_ID_BYTES + 4);
  if (count > PUT_BATCH || payload.length !== RUN_ID_BYTES + 8 + count * PUT_ENTRY) {
    throw new SgmError("data", `relay PUT of ${payload.length} bytes does not hold ${count} pages`);
  }
  const base = RUN_ID_BYTES + 8;
  return {
    run: payload.subarray(0, RUN_ID_BYTES),
    seq: dv.getUint32(RUN_ID_BYTES),
    count,
    digestAt: (n) => base + n * PUT_ENTRY,
    pageAt: (n) => base + n * PUT_ENTRY + DIGEST_BYTES,
  };
}

// ---- ACK --------------------------------------------------------------------------

export function encodeAck(seq: number, refused: readonly boolean[]): Uint8Array {
  const bits = bitmap(refused);
  const out = new Uint8Array(8 + bits.length);
  const dv = view(out);
  dv.setUint32(0, seq);
  dv.setUint32(4, refused.length);
  out.set(bits, 8);
  return out;
}

export function readAck(payload: Uint8Array): { seq: number; refused: boolean[] } {
  if (payload.length < 8) throw new SgmError("data", "relay ACK shorter than its header");
  const dv = view(payload);
  const count = dv.getUint32(4);
  if (count > PUT_BATCH || payload.length !== 8 + Math.ceil(count / 8)) throw new SgmError("data", `relay ACK for ${count} pages of ${payload.length} bytes`);
  return { seq: dv.getUint32(0), refused: readBitmap(payload.subarray(8), count) };
}

// ---- GET, HAS ---------------------------------------------------------------------

/** GET or HAS for the run: a request id and digests (given as one buffer of count x 32 bytes). */
export function encodeDigestRequest(run: Uint8Array, req: number, digests: Uint8Array): Uint8Array {
  const count = digests.length / DIGEST_BYTES;
  if (!Number.isInteger(count) || count > GET_BATCH) throw new SgmError("internal", `relay request of ${digests.length} digest bytes`);
  const out = new Uint8Array(RUN_ID_BYTES + 8 + digests.length);
  out.set(run.subarray(0, RUN_ID_BYTES), 0);
  const dv = view(out);
  dv.setUint32(RUN_ID_BYTES, req);
  dv.setUint32(RUN_ID_BYTES + 4, count);
  out.set(digests, RUN_ID_BYTES + 8);
  return out;
}

export function readDigestRequest(payload: Uint8Array, what: string): { run: Uint8Array; req: number; count: number; digests: Uint8Array } {
  if (payload.length < RUN_ID_BYTES + 8) throw new SgmError("data", `relay ${what} shorter than its header`);
  const dv = view(payload);
  const count = dv.getUint32(RUN_ID_BYTES + 4);
  if (count > GET_BATCH || payload.length !== RUN_ID_BYTES + 8 + count * DIGEST_BYTES) {
    throw new SgmError("data", `relay ${what} of ${payload.length} bytes does not hold ${count} digests`);
  }
  return { run: payload.subarray(0, RUN_ID_BYTES), req: dv.getUint32(RUN_ID_BYTES), count, digests: payload.subarray(RUN_ID_BYTES + 8) };
}

// ---- PAGES --------------------------------------------------------------------------

/** Builds a PAGES reply entry by entry, into `buf` (at least pagesBytes(maxEntries)); found pages are copied in. */
export class PagesBuilder {
  private readonly buf: Uint8Array;
  private len = 8;
  private count = 0;

  static bytesFor(maxEntries: number): number {
    return 8 + maxEntries * (1 + PUT_ENTRY);
  }

  constructor(req: number, maxEntries: number, buf: Uint8Array = new Uint8Array(PagesBuilder.bytesFor(maxEntries))) {
    if (buf.length < PagesBuilder.bytesFor(maxEntries)) throw new SgmError("internal", `PAGES buffer of ${buf.length} bytes for ${maxEntries} entries`);
    this.buf = buf;
    view(this.buf).setUint32(0, req);
  }

  /**
   * Adds an entry for the digest at digest[digestAt ..]; when `found`,
   * returns where in the buffer its page goes (the caller copies its 4096
   * bytes there), otherwise -1.
   */
  addEntry(digest: Uint8Array, digestAt: number, found: boolean): number {
    this.buf[this.len] = found ? 1 : 0;
    copyBytes(digest, digestAt, this.buf, this.len + 1, DIGEST_BYTES);
    this.len += 1 + DIGEST_BYTES;
    this.count++;
    if (!found) return -1;
    const pageAt = this.len;
    this.len += PAGE_BYTES;
    return pageAt;
  }

  take(): Uint8Array {
    view(this.buf).setUint32(4, this.count);
    return this.buf.subarray(0, this.len);
  }
}

/** A PAGES payload's pages, all `stride` apart, when every entry holds one (for hashing them in one call); else null. */
export function everyPageFound(payload: Uint8Array): { pages: Uint8Array; stride: number; count: number } | null {
  const stride = 1 + DIGEST_BYTES + PAGE_BYTES;
  if (payload.length < 8) return null;
  const count = view(payload).getUint32(4);
  if (count === 0 || payload.length !== 8 + count * stride) return null;
  for (let n = 0; n < count; n++) if (payload[8 + n * stride] !== 1) return null;
  return { pages: payload.subarray(8 + 1 + DIGEST_BYTES), stride, count };
}

/** Walks a PAGES reply; pageAt is -1 for a digest the relay does not hold. */
export function readPages(payload: Uint8Array, visit: (digestAt: number, pageAt: number) => void): number {
  if (payload.length < 8) throw new SgmError("data", "relay PAGES shorter than its header");
  const dv = view(payload);
  const count = dv.getUint32(4);
  if (count > GET_BATCH) throw new SgmError("data", `relay PAGES with ${count} entries`);
  let p = 8;
  for (let n = 0; n < count; n++) {
    if (p + 1 + DIGEST_BYTES > payload.length) throw new SgmError("data", `relay PAGES ends inside entry ${n}`);
    const found = payload[p] === 1;
    const digestAt = p + 1;
    p += 1 + DIGEST_BYTES;
    if (found) {
      if (p + PAGE_BYTES > payload.length) throw new SgmError("data", `relay PAGES ends inside page ${n}`);
      visit(digestAt, p);
      p += PAGE_BYTES;
    } else {
      visit(digestAt, -1);
    }
  }
  if (p !== payload.length) throw new SgmError("data", `relay PAGES has ${payload.length - p} bytes after its entries`);
  return dv.getUint32(0);
}

// ---- RELEASE -------------------------------------------------------------------------

export function encodeRelease(run: Uint8Array, digests: Uint8Array): Uint8Array {
  const count = digests.length / DIGEST_BYTES;
  if (!Number.isInteger(count) || count > RELEASE_BATCH) throw new SgmError("internal", `relay RELEASE of ${digests.length} digest bytes`);
  const out = new Uint8Array(RUN_ID_BYTES + 4 + digests.length);
  out.set(run, 0);
  view(out).setUint32(RUN_ID_BYTES, count);
  out.set(digests, RUN_ID_BYTES + 4);
  return out;
}

export function readRelease(payload: Uint8Array): { run: Uint8Array; count: number; digests: Uint8Array } {
  if (payload.length < RUN_ID_BYTES + 4) throw new SgmError("data", "relay RELEASE shorter than its header");
  const count = view(payload).getUint32(RUN_ID_BYTES);
  if (count > RELEASE_BATCH || payload.length !== RUN_ID_BYTES + 4 + count * DIGEST_BYTES) {
    throw new SgmError("data", `relay RELEASE of ${payload.length} bytes does not hold ${count} digests`);
  }
  return { run: payload.subarray(0, RUN_ID_BYTES), count, digests: payload.subarray(RUN_ID_BYTES + 4) };
}

// ---- HOLD ----------------------------------------------------------------------------

/** The digests of a PUT payload (its entries without their pages), into out[at ..). */
function copyDigestsOf(put: Uint8Array, out: Uint8Array, at: number): number {
  const frame = readPut(put);
  for (let n = 0; n < frame.count; n++) copyBytes(put, frame.digestAt(n), out, at + n * DIGEST_BYTES, DIGEST_BYTES);
  return frame.count;
}

/** A HOLD of the digests of a PUT payload (built, not sent): the same run and seq, the content kept by `keeper`. */
export function encodeHoldOf(put: Uint8Array, keeper: Uint8Array): Uint8Array {
  const count = readPut(put).count;
  const out = new Uint8Array(2 * RUN_ID_BYTES + 8 + count * DIGEST_BYTES);
  out.set(put.subarray(0, RUN_ID_BYTES), 0);
  out.set(keeper.subarray(0, RUN_ID_BYTES), RUN_ID_BYTES);
  out.set(put.subarray(RUN_ID_BYTES, RUN_ID_BYTES + 8), 2 * RUN_ID_BYTES);
  copyDigestsOf(put, out, 2 * RUN_ID_BYTES + 8);
  return out;
}

/** A KEEP, for `keeper`, of what a PUT payload's run put. */
export function encodeKeepOf(keeper: Uint8Array, put: Uint8Array): Uint8Array {
  const count = readPut(put).count;
  const out = new Uint8Array(2 * RUN_ID_BYTES + 4 + count * DIGEST_BYTES);
  out.set(keeper.subarray(0, RUN_ID_BYTES), 0);
  out.set(put.subarray(0, RUN_ID_BYTES), RUN_ID_BYTES);
  view(out).setUint32(2 * RUN_ID_BYTES, count);
  copyDigestsOf(put, out, 2 * RUN_ID_BYTES + 4);
  return out;
}

export function readKeep(payload: Uint8Array): { keeper: Uint8Array; run: Uint8Array; count: number; digests: Uint8Array } {
  const at = 2 * RUN_ID_BYTES + 4;
  if (payload.length < at) throw new SgmError("data", "relay KEEP shorter than its header");
  const count = view(payload).getUint32(2 * RUN_ID_BYTES);
  if (count > PUT_BATCH || payload.length !== at + count * DIGEST_BYTES) {
    throw new SgmError("data", `relay KEEP of ${payload.length} bytes does not hold ${count} digests`);
  }
  return { keeper: payload.subarray(0, RUN_ID_BYTES), run: payload.subarray(RUN_ID_BYTES, 2 * RUN_ID_BYTES), count, digests: payload.subarray(at) };
}

export function readHold(payload: Uint8Array): { run: Uint8Array; keeper: Uint8Array; seq: number; count: number; digests: Uint8Array } {
  const at = 2 * RUN_ID_BYTES + 8;
  if (payload.length < at) throw new SgmError("data", "relay HOLD shorter than its header");
  const dv = view(payload);
  const count = dv.getUint32(2 * RUN_ID_BYTES + 4);
  if (count > PUT_BATCH || payload.length !== at + count * DIGEST_BYTES) {
    throw new SgmError("data", `relay HOLD of ${payload.length} bytes does not hold ${count} digests`);
  }
  return {
    run: payload.subarray(0, RUN_ID_BYTES),
    keeper: payload.subarray(RUN_ID_BYTES, 2 * RUN_ID_BYTES),
    seq: dv.getUint32(2 * RUN_ID_BYTES),
    count,
    digests: payload.subarray(at),
  };
}

// ---- HAS_REPLY ---------------------------------------------------------------------------

export function encodeHasReply(req: number, held: readonly boolean[]): Uint8Array {
  const bits = bitmap(held);
  const out = new Uint8Array(8 + bits.length);
  const dv = view(out);
  dv.setUint32(0, req);
  dv.setUint32(4, held.length);
  out.set(bits, 8);
  return out;
}

export function readHasReply(payload: Uint8Array): { req: number; held: boolean[] } {
  if (payload.length < 8) throw new SgmError("data", "relay HAS reply shorter than its header");
  const dv = view(payload);
  const count = dv.getUint32(4);
  if (count > GET_BATCH || payload.length !== 8 + Math.ceil(count / 8)) throw new SgmError("data", `relay HAS reply for ${count} digests of ${payload.length} bytes`);
  return { req: dv.getUint32(0), held: readBitmap(payload.subarray(8), count) };
}
