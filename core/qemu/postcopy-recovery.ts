// Postcopy recovery as a source does it (migration/migration.c
// postcopy_do_resume, ram.c ram_dirty_bitmap_sync_all): on a fresh channel
// to a destination in postcopy-paused, for each RAM block a RECV_BITMAP
// command, answered on the return path by the block's received bitmap; then
// POSTCOPY_RESUME, answered by RESUME_ACK. From then on the stream goes on
// as postcopy: RAM pages, commands, the end.
//
// The bitmap answer is a return-path message (RECV_BITMAP: the block's
// name) followed by bytes outside any message: be64 size, the bitmap as
// little-endian 64-bit words (bit j of byte k: page 8k+j of the block),
// and be64 RAMBLOCK_RECV_BITMAP_ENDING (ram.c ramblock_recv_bitmap_send).

import { SgmError } from "../errors.ts";
import { ReturnPath } from "./constants.ts";
import { be32, message } from "./return-path.ts";

const RECV_BITMAP_ENDING = 0x0123456789abcdefn;
const RESUME_ACK_VALUE = 1;
const latin1 = new TextDecoder("latin1");

/** RECV_BITMAP's payload: the block's name, length first. */
export function recvBitmapPayload(block: string): Uint8Array {
  const name = new TextEncoder().encode(block);
  if (name.length > 255) throw new SgmError("internal", `RAM block name '${block}' too long`);
  const out = new Uint8Array(1 + name.length);
  out[0] = name.length;
  out.set(name, 1);
  return out;
}

/** RECV_BITMAP's block name (the command a recovering source sends). */
export function readRecvBitmapPayload(payload: Uint8Array): string {
  if (payload.length < 1 || payload[0]! + 1 !== payload.length) throw new SgmError("data", `RECV_BITMAP of ${payload.length} bytes`);
  return latin1.decode(payload.subarray(1));
}

/**
 * The destination's answer to RECV_BITMAP: the block's received bitmap,
 * `received(page)` for each of its `pages`, as ram.c sends it.
 */
export function encodeReceivedBitmap(block: string, pages: number, received: (page: number) => boolean): Uint8Array {
  const size = Math.ceil(pages / 64) * 8;
  const head = message(ReturnPath.RECV_BITMAP, recvBitmapPayload(block));
  const out = new Uint8Array(head.length + 8 + size + 8);
  out.set(head);
  const dv = new DataView(out.buffer);
  dv.setBigUint64(head.length, BigInt(size));
  const bits = out.subarray(head.length + 8, head.length + 8 + size);
  for (let p = 0; p < pages; p++) if (received(p)) bits[p >> 3]! |= 1 << (p & 7);
  dv.setBigUint64(head.length + 8 + size, RECV_BITMAP_ENDING);
  return out;
}

export function encodeResumeAck(): Uint8Array {
  return message(ReturnPath.RESUME_ACK, be32(RESUME_ACK_VALUE));
}

/** One block's received bitmap: has the destination this page of the block? */
export class ReceivedBitmap {
  readonly block: string;
  private readonly bits: Uint8Array;

  constructor(block: string, bits: Uint8Array) {
    this.block = block;
    this.bits = bits;
  }

  has(page: number): boolean {
    return ((this.bits[page >> 3] ?? 0) & (1 << (page & 7))) !== 0;
  }

  /** Pages the bitmap covers (a multiple of 64). */
  get pages(): number {
    return this.bits.length * 8;
  }
}

type Expect = { kind: "bitmap-message" } | { kind: "bitmap-bytes"; block: string } | { kind: "ack" } | { kind: "done" };

/**
 * Reads the return path during recovery: the bitmaps, in the order asked,
 * then RESUME_ACK. Whatever follows the ack is kept for the ordinary
 * return-path reader, and passed to it once it is handed over (handOver).
 */
export class RecoveryReader {
  private buf = new Uint8Array(0);
  private expect: Expect = { kind: "bitmap-message" };
  private readonly wanted: string[];
  private readonly bitmapBytes: number[];
  readonly bitmaps = new Map<string, ReceivedBitmap>();
  private readonly allBitmaps = Promise.withResolvers<Map<string, ReceivedBitmap>>();
  private readonly finished = Promise.withResolvers<void>();
  private sink: ((data: Uint8Array) => void) | null = null;
  /** Resolves once every block's bitmap came. */
  readonly bitmapsIn = this.allBitmaps.promise;
  /** Resolves once RESUME_ACK came. */
  readonly acked = this.finished.promise;

  /** `blocks`: the blocks asked for, in order, and their pages. */
  constructor(blocks: ReadonlyArray<{ name: string; pages: number }>) {
    this.wanted = blocks.map((b) => b.name);
    // QEMU's size: its bitmap's longs, whole (ramblock_recv_bitmap_send)
    this.bitmapBytes = blocks.map((b) => Math.ceil(b.pages / 64) * 8);
    if (this.wanted.length === 0) throw new SgmError("internal", "postcopy recovery of no RAM block");
    this.bitmapsIn.catch(() => {});
    this.acked.catch(() => {});
  }

  feed(chunk: Uint8Array): void {
    if (this.sink) {
      this.sink(chunk);
      return;
    }
    const joined = new Uint8Array(this.buf.length + chunk.length);
    joined.set(this.buf);
    joined.set(chunk, this.buf.length);
    this.buf = joined;
    try {
      while (this.step()) {}
    } catch (err) {
      this.fail(err as Error);
      throw err;
    }
  }

  /** From now on the return path's bytes after the ack go to `sink`, those already here first. */
  handOver(sink: (data: Uint8Array) => void): void {
    if (this.expect.kind !== "done") throw new SgmError("internal", "return path handed over before RESUME_ACK");
    this.sink = sink;
    const held = this.buf;
    this.buf = new Uint8Array(0);
    if (held.length > 0) sink(held);
  }

  fail(reason: Error): void {
    this.allBitmaps.reject(reason);
    this.finished.reject(reason);
  }

  /** Takes one item off the buffer if it is all there. */
  private step(): boolean {
    const b = this.buf;
    const dv = new DataView(b.buffer, b.byteOffset, b.length);
    const e = this.expect;
    if (e.kind === "done") return false;
    if (e.kind === "bitmap-bytes") {
      if (b.length < 8) return false;
      const size = Number(dv.getBigUint64(0));
      const expected = this.bitmapBytes[this.bitmaps.size]!;
      if (size !== expected) throw new SgmError("data", `postcopy recovery: a bitmap of ${size} bytes for block '${e.block}', not ${expected}`);
      if (b.length < 16 + size) return false;
      if (dv.getBigUint64(8 + size) !== RECV_BITMAP_ENDING) throw new SgmError("data", `postcopy recovery: block '${e.block}''s bitmap lacks its end mark`);
      this.bitmaps.set(e.block, new ReceivedBitmap(e.block, b.slice(8, 8 + size)));
      this.buf = b.subarray(16 + size);
      if (this.bitmaps.size < this.wanted.length) {
        this.expect = { kind: "bitmap-message" };
        return true;
      }
      this.expect = { kind: "ack" };
      this.allBitmaps.resolve(this.bitmaps);
      return true;
    }
    if (b.length < 4) return false;
    const type = dv.getUint16(0);
    const len = dv.getUint16(2);
    if (b.length < 4 + len) return false;
    const payload = b.subarray(4, 4 + len);
    this.buf = b.subarray(4 + len);
    if (e.kind === "bitmap-message") {
      if (type !== ReturnPath.RECV_BITMAP || len < 1 || payload[0]! + 1 > len) throw new SgmError("data", `postcopy recovery: return-path message ${type} where a received bitmap was due`);
      const block = latin1.decode(payload.subarray(1, 1 + payload[0]!));
      const next = this.wanted[this.bitmaps.size];
      if (block !== next) throw new SgmError("data", `postcopy recovery: the bitmap of block '${block}' came where '${next}' was due`);
      this.expect = { kind: "bitmap-bytes", block };
      return true;
    }
    if (type !== ReturnPath.RESUME_ACK || len !== 4) throw new SgmError("data", `postcopy recovery: return-path message ${type} (${len} bytes) where RESUME_ACK was due`);
    const value = new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0);
    if (value !== RESUME_ACK_VALUE) throw new SgmError("data", `postcopy recovery: RESUME_ACK ${value}`);
    this.expect = { kind: "done" };
    this.finished.resolve();
    return false;
  }
}
