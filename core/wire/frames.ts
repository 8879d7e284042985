// Frame codec for every sgm peer-to-peer TCP connection.
//
// A frame is an 8-byte header followed by its payload:
//   u8 protocol version (WIRE_VERSION), u8 type, u16 flags (big-endian, 0),
//   u32 payload length (big-endian).
// Frame types 1..15 are reserved for the connection itself (auth.ts defines
// 1..5); other modules define theirs from 16 upward.

import { SgmError } from "../errors.ts";
import { scribbleHandled } from "../test-faults.ts";

export const WIRE_VERSION = 2;
export const FRAME_HEADER_BYTES = 8;
/** The largest length the header can carry. */
export const MAX_FRAME_LENGTH = 0xffff_ffff;
/** The first frame type free for modules other than the wire itself. */
export const FIRST_APP_FRAME_TYPE = 16;

/** Maximum payload length for a frame type, or undefined for a type this side does not know. */
export type MaxPayload = (type: number) => number | undefined;

/** Called once per decoded frame; see FrameDecoder for how long `payload` stays valid. */
export type FrameHandler = (type: number, payload: Uint8Array) => void;

export function encodeFrameHeader(type: number, length: number, out: Uint8Array, offset: number): void {
  if (!Number.isInteger(type) || type < 0 || type > 0xff) {
    throw new SgmError("internal", `frame type ${type} is not a byte`);
  }
  if (!Number.isInteger(length) || length < 0 || length > MAX_FRAME_LENGTH) {
    throw new SgmError("internal", `frame type ${type} length ${length} does not fit the header`);
  }
  out[offset] = WIRE_VERSION;
  out[offset + 1] = type;
  out[offset + 2] = 0;
  out[offset + 3] = 0;
  out[offset + 4] = length >>> 24;
  out[offset + 5] = (length >>> 16) & 0xff;
  out[offset + 6] = (length >>> 8) & 0xff;
  out[offset + 7] = length & 0xff;
}

/** Header and payload in one new buffer. */
export function frame(type: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(FRAME_HEADER_BYTES + payload.length);
  encodeFrameHeader(type, payload.length, out, 0);
  out.set(payload, FRAME_HEADER_BYTES);
  return out;
}

/**
 * Splits a byte stream into frames, checking each header before its payload
 * is buffered, so a hostile peer cannot make it allocate beyond the bound of
 * the frame type it claims.
 *
 * The payload handed to the handler is a view that is valid only during the
 * call: it points into the chunk given to feed(), or into a buffer the
 * decoder reuses for the next frame that spans chunks. Copy it (slice()) to
 * keep it.
 *
 * Any error, including one thrown by the handler, leaves the decoder failed:
 * every later feed() throws that error again, because the stream position is
 * lost.
 */
export class FrameDecoder {
  private maxPayload: MaxPayload;
  private readonly onFrame: FrameHandler;
  private failure: Error | undefined;

  // A frame that spans chunks is assembled here: first its header, then its payload.
  private readonly header = new Uint8Array(FRAME_HEADER_BYTES);
  private headerFill = 0;
  private partType = -1; // -1 while no header is complete
  private partLength = 0;
  private partFill = 0;
  private assembly = new Uint8Array(0);

  constructor(maxPayload: MaxPayload, onFrame: FrameHandler) {
    this.maxPayload = maxPayload;
    this.onFrame = onFrame;
  }

  /** Changes the bounds from the next header on (an authenticated peer may send larger frames). */
  setMaxPayload(maxPayload: MaxPayload): void {
    this.maxPayload = maxPayload;
  }

  /** True while part of a frame has arrived but not all of it. */
  get midFrame(): boolean {
    return this.headerFill > 0;
  }

  get failed(): Error | undefined {
    return this.failure;
  }

  feed(chunk: Uint8Array): void {
    if (this.failure) throw this.failure;
    try {
      this.decode(chunk);
    } catch (err) {
      this.failure = err instanceof Error ? err : new SgmError("internal", String(err));
      throw this.failure;
    }
  }

  private decode(chunk: Uint8Array): void {
    let pos = this.headerFill > 0 ? this.continuePartial(chunk) : 0;
    const end = chunk.length;
    const view = new DataView(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    while (end - pos >= FRAME_HEADER_BYTES) {
      const length = this.checkHeader(view.getUint8(pos), view.getUint8(pos + 1), view.getUint16(pos + 2), view.getUint32(pos + 4));
      const type = view.getUint8(pos + 1);
      const start = pos + FRAME_HEADER_BYTES;
      if (end - start >= length) {
        pos = start + length;
        this.onFrame(type, chunk.subarray(start, pos));
        continue;
      }
      this.header.set(chunk.subarray(pos, start));
      this.headerFill = FRAME_HEADER_BYTES;
      this.beginPayload(type, length);
      this.partFill = end - start;
      this.assembly.set(chunk.subarray(start, end));
      return;
    }
    if (pos < end) {
      this.header.set(chunk.subarray(pos, end));
      this.headerFill = end - pos;
    }
  }

  /** Completes a frame begun in an earlier chunk; returns where the rest of the chunk starts. */
  private continuePartial(chunk: Uint8Array): number {
    let pos = 0;
    if (this.headerFill < FRAME_HEADER_BYTES) {
      const take = Math.min(FRAME_HEADER_BYTES - this.headerFill, chunk.length);
      this.header.set(chunk.subarray(0, take), this.headerFill);
      this.headerFill += take;
      pos = take;
      if (this.headerFill < FRAME_HEADER_BYTES) return pos;
      const h = new DataView(this.header.buffer);
      const length = this.checkHeader(h.getUint8(0), h.getUint8(1), h.getUint16(2), h.getUint32(4));
      this.beginPayload(h.getUint8(1), length);
    }
    const take = Math.min(this.partLength - this.partFill, chunk.length - pos);
    this.assembly.set(chunk.subarray(pos, pos + take), this.partFill);
    this.partFill += take;
    pos += take;
    if (this.partFill < this.partLength) return pos;
    const type = this.partType;
    this.headerFill = 0;
    this.partType = -1;
    const payload = this.assembly.subarray(0, this.partLength);
    this.onFrame(type, payload);
    scribbleHandled(payload);
    return pos;
  }

  private beginPayload(type: number, length: number): void {
    if (length > this.assembly.length) {
      // Doubling keeps growth rare; the bound of this type caps it (length itself is within it).
      const bound = this.maxPayload(type) ?? length;
      this.assembly = new Uint8Array(Math.max(length, Math.min(this.assembly.length * 2, bound)));
    }
    this.partType = type;
    this.partLength = length;
    this.partFill = 0;
  }

  /** Returns the payload length once the header is known to be acceptable. */
  private checkHeader(version: number, type: number, flags: number, length: number): number {
    if (version !== WIRE_VERSION) {
      // versions before this one were sgm's own: say what to do about it
      const earlier = version >= 1 && version < WIRE_VERSION ? ": the peer runs an earlier sgm; put the same sgm on every host" : "";
      throw new SgmError("data", `frame with protocol version ${version} (expected ${WIRE_VERSION}), type ${type}, length ${length}${earlier}`);
    }
    if (flags !== 0) {
      throw new SgmError("data", `frame type ${type} has flags 0x${flags.toString(16).padStart(4, "0")} (expected 0), length ${length}`);
    }
    const bound = this.maxPayload(type);
    if (bound === undefined) throw new SgmError("data", `unknown frame type ${type}, length ${length}`);
    if (length > bound) throw new SgmError("data", `frame type ${type} length ${length} exceeds its bound of ${bound} bytes`);
    return length;
  }
}
