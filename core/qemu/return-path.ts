// The return path: messages a migration destination sends back to its source
// on the same socket (migration/migration.c: migrate_send_rp_message). sgm
// reads them from destination QEMUs (page requests, PONG, SHUT) and writes
// them to source QEMUs (PONG, SHUT, page requests) when it is their target.

import { SgmError } from "../errors.ts";
import { ReturnPath } from "./constants.ts";

export interface ReturnPathHandler {
  onShut(status: number): void;
  onPong(value: number): void;
  /** A page request: byte offset and length within the named block. */
  onPageRequest(block: string, start: number, length: number): void;
}

const MAX_MESSAGE = 4 + 8 + 4 + 1 + 255;
const latin1 = new TextDecoder("latin1");

export class ReturnPathReader {
  private readonly handler: ReturnPathHandler;
  private buf = new Uint8Array(MAX_MESSAGE * 2);
  private len = 0;
  private lastBlock: string | null = null;

  constructor(handler: ReturnPathHandler) {
    this.handler = handler;
  }

  feed(chunk: Uint8Array): void {
    let offset = 0;
    while (offset < chunk.length) {
      const take = Math.min(chunk.length - offset, this.buf.length - this.len);
      this.buf.set(chunk.subarray(offset, offset + take), this.len);
      this.len += take;
      offset += take;
      this.drain();
    }
  }

  private drain(): void {
    const dv = new DataView(this.buf.buffer, this.buf.byteOffset, this.len);
    let pos = 0;
    while (this.len - pos >= 4) {
      const type = dv.getUint16(pos);
      const len = dv.getUint16(pos + 2);
      if (len > MAX_MESSAGE - 4) throw new SgmError("data", `return path: message type ${type} of ${len} bytes`);
      if (this.len - pos < 4 + len) break;
      this.dispatch(type, dv, pos + 4, len);
      pos += 4 + len;
    }
    this.buf.copyWithin(0, pos, this.len);
    this.len -= pos;
  }

  private dispatch(type: number, dv: DataView, p: number, len: number): void {
    const need = (n: number, what: string) => {
      if (len < n) throw new SgmError("data", `return path: ${what} of ${len} bytes`);
    };
    switch (type) {
      case ReturnPath.SHUT:
        need(4, "SHUT");
        this.handler.onShut(dv.getUint32(p));
        return;
      case ReturnPath.PONG:
        need(4, "PONG");
        this.handler.onPong(dv.getUint32(p));
        return;
      case ReturnPath.REQ_PAGES_ID: {
        need(13, "REQ_PAGES_ID");
        const n = dv.getUint8(p + 12);
        need(13 + n, "REQ_PAGES_ID");
        this.lastBlock = latin1.decode(this.buf.subarray(p + 13, p + 13 + n));
        this.request(dv, p, this.lastBlock);
        return;
      }
      case ReturnPath.REQ_PAGES:
        need(12, "REQ_PAGES");
        if (this.lastBlock === null) throw new SgmError("data", "return path: REQ_PAGES before any block was named");
        this.request(dv, p, this.lastBlock);
        return;
      default:
        throw new SgmError("data", `return path: unexpected message type ${type}`);
    }
  }

  private request(dv: DataView, p: number, block: string): void {
    const start = dv.getUint32(p) * 0x1_0000_0000 + dv.getUint32(p + 4);
    this.handler.onPageRequest(block, start, dv.getUint32(p + 8));
  }
}

export function message(type: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(4 + payload.length);
  const dv = new DataView(out.buffer);
  dv.setUint16(0, type);
  dv.setUint16(2, payload.length);
  out.set(payload, 4);
  return out;
}

export function be32(value: number): Uint8Array {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, value);
  return out;
}

export function encodeShut(status: number): Uint8Array {
  return message(ReturnPath.SHUT, be32(status));
}

export function encodePong(value: number): Uint8Array {
  return message(ReturnPath.PONG, be32(value));
}

/** A page request naming its block (REQ_PAGES_ID). */
export function encodePageRequest(block: string, start: number, length: number): Uint8Array {
  const name = new TextEncoder().encode(block);
  const payload = new Uint8Array(13 + name.length);
  const dv = new DataView(payload.buffer);
  dv.setUint32(0, Math.floor(start / 0x1_0000_0000));
  dv.setUint32(4, start >>> 0);
  dv.setUint32(8, length);
  dv.setUint8(12, name.length);
  payload.set(name, 13);
  return message(ReturnPath.REQ_PAGES_ID, payload);
}
