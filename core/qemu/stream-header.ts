// The head of a migration stream: magic, version and configuration section,
// read once per stream before any record.

import type { SgmError } from "../errors.ts";
import { QEVM_MAGIC, QEVM_VERSION, Section } from "./constants.ts";

const latin1 = new TextDecoder("latin1");

/**
 * The offset after the header that starts at b[pos], or null while b[pos..end)
 * does not hold all of it. fail builds the error to throw.
 */
export function parseStreamHeader(b: Uint8Array, pos: number, end: number, fail: (message: string) => SgmError): number | null {
  if (end - pos < 9) return null;
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const magic = dv.getUint32(pos);
  if (magic !== QEVM_MAGIC) throw fail(`bad magic 0x${magic.toString(16).padStart(8, "0")} (not a QEMU migration stream)`);
  const version = dv.getUint32(pos + 4);
  if (version !== QEVM_VERSION) throw fail(`unsupported stream version ${version}`);
  pos += 8;
  if (b[pos] === Section.CONFIGURATION) {
    if (end - pos < 5) return null;
    const nameLen = dv.getUint32(pos + 1);
    if (nameLen > 256) throw fail(`machine type name of ${nameLen} bytes`);
    pos += 5 + nameLen;
    // subsections: 0x05, counted name, be32 version, body known by name
    for (;;) {
      if (pos >= end) return null;
      if (b[pos] !== Section.SUBSECTION) break;
      if (end - pos < 2) return null;
      const n = b[pos + 1]!;
      if (end - pos < 2 + n + 4) return null;
      const name = latin1.decode(b.subarray(pos + 2, pos + 2 + n));
      pos += 2 + n + 4;
      const bodyLen = configurationBodyLength(b, dv, name, pos, end, fail);
      if (bodyLen === null) return null;
      pos += bodyLen;
    }
  }
  return pos;
}

function configurationBodyLength(
  b: Uint8Array,
  dv: DataView,
  name: string,
  pos: number,
  end: number,
  fail: (message: string) => SgmError,
): number | null {
  switch (name) {
    case "configuration/target-page-bits":
      return end - pos < 4 ? null : 4;
    case "configuration/uuid":
      return end - pos < 16 ? null : 16;
    case "configuration/capabilities": {
      if (end - pos < 4) return null;
      const count = dv.getUint32(pos);
      if (count > 64) throw fail(`configuration lists ${count} capabilities`);
      let p = pos + 4;
      for (let i = 0; i < count; i++) {
        if (p >= end) return null;
        p += 1 + b[p]!;
      }
      return p > end ? null : p - pos;
    }
    default:
      throw fail(`unknown configuration subsection '${name}'`);
  }
}
