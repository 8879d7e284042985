// What sgm processes say to each other after authentication: the frame
// types and their bounds, and the binary data plane (page maps and page
// contents); control messages, small JSON objects, are in control.ts.
//
// PAGE_DATA: u32 count, then count x (32-byte BLAKE3 page digest, 4096-byte page)
// PAGE_MAP:  u16 vm, u16 0, u32 count, then count x entry:
//            u16 block, u32 page, u8 kind (0 zero, 1 digest, 2 pending), [32-byte digest]
//            (pending: a postcopy source discarded the page and sends it again)
// VM_BYTES:  u16 vm, u8 kind (1 stream header, 2 device state), u8 last, bytes
// LOCATIONS: u32 count, then count x (32-byte digest, u32 relay mask): content
//            the gather must fetch from those relays (bit i: the run's relay i)
// UNPIN:     u32 count, then count x 32-byte digest: content the scatter sent
//            the gather and will not name again unless it sends it again

import { DIGEST_BYTES, PAGE_BYTES, copyBytes } from "../dedup/digest.ts";
import { SgmError } from "../errors.ts";
import { grown } from "../typed-arrays.ts";
import { probeMaxPayload } from "./probe-frames.ts";
import { relayMaxPayload } from "./relay-messages.ts";

export const FrameType = {
  CONTROL: 16,
  VM_BYTES: 17,
  PAGE_MAP: 18,
  PAGE_DATA: 19,
  LOCATIONS: 27,
  UNPIN: 28,
} as const;

export const MAX_CONTROL = 1024 * 1024;
export const MAX_VM_BYTES = 4 * 1024 * 1024;
/** Pages per PAGE_DATA frame, and entries per PAGE_MAP frame. */
export const DATA_BATCH = 64;
export const MAP_BATCH = 16384;
export const DATA_ENTRY = DIGEST_BYTES + PAGE_BYTES;
export const MAP_ENTRY_ZERO = 7;
export const MAP_ENTRY_DIGEST = 7 + DIGEST_BYTES;
export const LOCATION_ENTRY = DIGEST_BYTES + 4;

export function maxPayload(type: number): number | undefined {
  switch (type) {
    case FrameType.CONTROL:
      return MAX_CONTROL;
    case FrameType.VM_BYTES:
      return 4 + MAX_VM_BYTES;
    case FrameType.PAGE_MAP:
      return 8 + MAP_BATCH * MAP_ENTRY_DIGEST;
    case FrameType.PAGE_DATA:
      return 4 + DATA_BATCH * DATA_ENTRY;
    case FrameType.LOCATIONS:
      return 4 + MAP_BATCH * LOCATION_ENTRY;
    case FrameType.UNPIN:
      return 4 + MAP_BATCH * DIGEST_BYTES;
    default:
      return relayMaxPayload(type) ?? probeMaxPayload(type);
  }
}

export const VmBytesKind = { HEADER: 1, DEVICE_STATE: 2 } as const;
export const MapKind = { ZERO: 0, DIGEST: 1, PENDING: 2 } as const;
/** What readPageMap passes as the digest offset of entries without a digest. */
export const ENTRY_ZERO = -1;
export const ENTRY_PENDING = -2;

// ---- VM_BYTES ---------------------------------------------------------------------

export function encodeVmBytes(vm: number, kind: number, last: boolean, bytes: Uint8Array): Uint8Array {
  const out = new Uint8Array(4 + bytes.length);
  const dv = new DataView(out.buffer);
  dv.setUint16(0, vm);
  out[2] = kind;
  out[3] = last ? 1 : 0;
  out.set(bytes, 4);
  return out;
}

export function decodeVmBytes(payload: Uint8Array): { vm: number; kind: number; last: boolean; bytes: Uint8Array } {
  if (payload.length < 4) throw new SgmError("data", "VM_BYTES frame shorter than its header");
  const dv = new DataView(payload.buffer, payload.byteOffset, payload.length);
  const kind = payload[2]!;
  if (kind !== VmBytesKind.HEADER && kind !== VmBytesKind.DEVICE_STATE) throw new SgmError("data", `VM_BYTES of unknown kind ${kind}`);
  return { vm: dv.getUint16(0), kind, last: payload[3] === 1, bytes: payload.subarray(4) };
}

// ---- PAGE_MAP ---------------------------------------------------------------------

/** Walks a PAGE_MAP payload; `digestAt` is an offset into `payload`, or ENTRY_ZERO, or ENTRY_PENDING. */
export function readPageMap(
  payload: Uint8Array,
  visit: (vm: number, block: number, page: number, digestAt: number) => void,
): void {
  if (payload.length < 8) throw new SgmError("data", "PAGE_MAP frame shorter than its header");
  const dv = new DataView(payload.buffer, payload.byteOffset, payload.length);
  const vm = dv.getUint16(0);
  const count = dv.getUint32(4);
  let p = 8;
  for (let n = 0; n < count; n++) {
    if (p + MAP_ENTRY_ZERO > payload.length) throw new SgmError("data", `PAGE_MAP frame ends inside entry ${n} of ${count}`);
    const block = dv.getUint16(p);
    const page = dv.getUint32(p + 2);
    const kind = payload[p + 6]!;
    if (kind === MapKind.ZERO || kind === MapKind.PENDING) {
      visit(vm, block, page, kind === MapKind.ZERO ? ENTRY_ZERO : ENTRY_PENDING);
      p += MAP_ENTRY_ZERO;
    } else if (kind === MapKind.DIGEST) {
      if (p + MAP_ENTRY_DIGEST > payload.length) throw new SgmError("data", `PAGE_MAP frame ends inside entry ${n} of ${count}`);
      visit(vm, block, page, p + MAP_ENTRY_ZERO);
      p += MAP_ENTRY_DIGEST;
    } else {
      throw new SgmError("data", `PAGE_MAP entry of unknown kind ${kind}`);
    }
  }
  if (p !== payload.length) throw new SgmError("data", `PAGE_MAP frame has ${payload.length - p} bytes after its ${count} entries`);
}

/** Builds PAGE_MAP payloads entry by entry, in buffers from `acquire`. */
export class PageMapBuilder {
  static readonly BUFFER_BYTES = 8 + MAP_BATCH * MAP_ENTRY_DIGEST;
  private readonly acquire: () => Uint8Array;
  private buf: Uint8Array;
  private dv: DataView;
  private len = 8;
  private count = 0;

  constructor(acquire: () => Uint8Array = () => new Uint8Array(PageMapBuilder.BUFFER_BYTES)) {
    this.acquire = acquire;
    this.buf = acquire();
    this.dv = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.byteLength);
  }

  get entries(): number {
    return this.count;
  }

  get full(): boolean {
    return this.count >= MAP_BATCH;
  }

  addZero(block: number, page: number): void {
    this.addShort(block, page, MapKind.ZERO);
  }

  addPending(block: number, page: number): void {
    this.addShort(block, page, MapKind.PENDING);
  }

  private addShort(block: number, page: number, kind: number): void {
    this.dv.setUint16(this.len, block);
    this.dv.setUint32(this.len + 2, page);
    this.buf[this.len + 6] = kind;
    this.len += MAP_ENTRY_ZERO;
    this.count++;
  }

  /** Adds an entry with the digest at digests[digestAt .. digestAt + 32); returns where it is in `buffer`. */
  addDigest(block: number, page: number, digests: Uint8Array, digestAt: number): number {
    this.dv.setUint16(this.len, block);
    this.dv.setUint32(this.len + 2, page);
    this.buf[this.len + 6] = MapKind.DIGEST;
    const at = this.len + MAP_ENTRY_ZERO;
    copyBytes(digests, digestAt, this.buf, at, DIGEST_BYTES);
    this.len += MAP_ENTRY_DIGEST;
    this.count++;
    return at;
  }

  /** The buffer the entries so far are in, until take(). */
  get buffer(): Uint8Array {
    return this.buf;
  }

  /** The finished payload for `vm` (a view of `buffer`); the builder starts on a new buffer. */
  take(vm: number): { payload: Uint8Array; buffer: Uint8Array } {
    this.dv.setUint16(0, vm);
    this.dv.setUint16(2, 0);
    this.dv.setUint32(4, this.count);
    const buffer = this.buf;
    const payload = buffer.subarray(0, this.len);
    this.buf = this.acquire();
    this.dv = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.byteLength);
    this.len = 8;
    this.count = 0;
    return { payload, buffer };
  }
}

// ---- PAGE_DATA --------------------------------------------------------------------

export function readPageData(payload: Uint8Array, visit: (digestAt: number, pageAt: number) => void): void {
  if (payload.length < 4) throw new SgmError("data", "PAGE_DATA frame shorter than its header");
  const count = new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0);
  if (payload.length !== 4 + count * DATA_ENTRY) {
    throw new SgmError("data", `PAGE_DATA frame of ${payload.length} bytes does not hold ${count} pages`);
  }
  for (let n = 0, p = 4; n < count; n++, p += DATA_ENTRY) visit(p, p + DIGEST_BYTES);
}

/** A PAGE_DATA payload's pages, all `stride` apart from the first: for hashing them in one call. */
export function pageDataPages(payload: Uint8Array): { pages: Uint8Array; stride: number; count: number } {
  let count = 0;
  readPageData(payload, () => count++);
  return { pages: payload.subarray(4 + DIGEST_BYTES), stride: DATA_ENTRY, count };
}

/** Builds PAGE_DATA payloads page by page, in buffers from `acquire`. */
export class PageDataBuilder {
  static readonly BUFFER_BYTES = 4 + DATA_BATCH * DATA_ENTRY;
  private readonly acquire: () => Uint8Array;
  private buf: Uint8Array;
  private count = 0;

  constructor(acquire: () => Uint8Array = () => new Uint8Array(PageDataBuilder.BUFFER_BYTES)) {
    this.acquire = acquire;
    this.buf = acquire();
  }

  get pages(): number {
    return this.count;
  }

  get full(): boolean {
    return this.count >= DATA_BATCH;
  }

  /** Copies the page in, with its digest from digests[digestAt .. digestAt + 32). */
  add(page: Uint8Array, digests: Uint8Array, digestAt: number): void {
    const at = 4 + this.count * DATA_ENTRY;
    copyBytes(digests, digestAt, this.buf, at, DIGEST_BYTES);
    this.buf.set(page, at + DIGEST_BYTES);
    this.count++;
  }

  take(): { payload: Uint8Array; buffer: Uint8Array } {
    new DataView(this.buf.buffer, this.buf.byteOffset, 4).setUint32(0, this.count);
    const buffer = this.buf;
    const payload = buffer.subarray(0, 4 + this.count * DATA_ENTRY);
    this.buf = this.acquire();
    this.count = 0;
    return { payload, buffer };
  }
}

// ---- UNPIN --------------------------------------------------------------------------

export function encodeDigests(digests: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(4 + digests.length * DIGEST_BYTES);
  new DataView(out.buffer).setUint32(0, digests.length);
  digests.forEach((d, n) => out.set(d, 4 + n * DIGEST_BYTES));
  return out;
}

export function readDigests(payload: Uint8Array, visit: (digestAt: number) => void): void {
  if (payload.length < 4) throw new SgmError("data", "UNPIN frame shorter than its header");
  const count = new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0);
  if (payload.length !== 4 + count * DIGEST_BYTES) throw new SgmError("data", `UNPIN frame of ${payload.length} bytes does not hold ${count} digests`);
  for (let n = 0; n < count; n++) visit(4 + n * DIGEST_BYTES);
}

// ---- LOCATIONS ------------------------------------------------------------------------

/**
 * LOCATIONS entries as they are decided, each digest copied in: no object
 * or view per entry (a scatter through relays adds one for most pages).
 */
export class LocationList {
  private bytes = new Uint8Array(256 * LOCATION_ENTRY);
  private count = 0;

  get length(): number {
    return this.count;
  }

  /** The digest at digest[at .. at + 32) is held by the relays in `mask`. */
  add(digest: Uint8Array, at: number, mask: number): void {
    const start = this.count * LOCATION_ENTRY;
    if (start + LOCATION_ENTRY > this.bytes.length) this.bytes = grown(this.bytes, 2 * this.bytes.length);
    const bytes = this.bytes;
    copyBytes(digest, at, bytes, start, DIGEST_BYTES);
    // the mask big-endian, as readLocations reads it
    bytes[start + DIGEST_BYTES] = mask >>> 24;
    bytes[start + DIGEST_BYTES + 1] = (mask >>> 16) & 0xff;
    bytes[start + DIGEST_BYTES + 2] = (mask >>> 8) & 0xff;
    bytes[start + DIGEST_BYTES + 3] = mask & 0xff;
    this.count++;
  }

  /** The LOCATIONS payloads of every entry so far, in order, as many a frame as its bound allows; the list is empty after. */
  take(): Uint8Array[] {
    const payloads: Uint8Array[] = [];
    for (let first = 0; first < this.count; first += MAP_BATCH) {
      const n = Math.min(MAP_BATCH, this.count - first);
      const out = new Uint8Array(4 + n * LOCATION_ENTRY);
      new DataView(out.buffer).setUint32(0, n);
      copyBytes(this.bytes, first * LOCATION_ENTRY, out, 4, n * LOCATION_ENTRY);
      payloads.push(out);
    }
    this.count = 0;
    return payloads;
  }
}

export function readLocations(payload: Uint8Array, visit: (digestAt: number, mask: number) => void): void {
  if (payload.length < 4) throw new SgmError("data", "LOCATIONS frame shorter than its header");
  const dv = new DataView(payload.buffer, payload.byteOffset, payload.length);
  const count = dv.getUint32(0);
  if (payload.length !== 4 + count * LOCATION_ENTRY) throw new SgmError("data", `LOCATIONS frame of ${payload.length} bytes does not hold ${count} entries`);
  for (let n = 0; n < count; n++) {
    const at = 4 + n * LOCATION_ENTRY;
    const mask = dv.getUint32(at + DIGEST_BYTES);
    if (mask === 0) throw new SgmError("data", "LOCATIONS entry names no relay");
    visit(at, mask);
  }
}
