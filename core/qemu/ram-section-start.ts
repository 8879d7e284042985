// The RAM section's START record, read once per stream: its section header,
// then the RAM block list whose names and sizes every later page record
// refers to. The footer after it is left to the reader, which tracks whether
// the source sends footers at all.

import type { SgmError } from "../errors.ts";
import { RAM_FLAG_MASK, RAM_IDSTR, RAM_SECTION_VERSION, RamFlag, ramFlagName, Section, TPS } from "./constants.ts";
import type { RamBlockInfo } from "./reader-handler.ts";

const latin1 = new TextDecoder("latin1");

export interface RamSectionStart {
  id: number;
  blocks: RamBlockInfo[];
  /** The offset after the block list's EOS, where the section footer is. */
  next: number;
}

/**
 * The START or FULL section record at b[pos], which must be RAM's START, up to
 * its footer; null while b[pos..end) does not hold all of it. ramSectionId is
 * the id of the RAM section already started, or -1; advised, whether
 * POSTCOPY_ADVISE was read. fail builds the error to throw.
 */
export function parseRamSectionStart(
  b: Uint8Array,
  pos: number,
  end: number,
  type: number,
  ramSectionId: number,
  advised: boolean,
  fail: (message: string) => SgmError,
): RamSectionStart | null {
  if (end - pos < 6) return null;
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const id = dv.getUint32(pos + 1);
  const n = b[pos + 5]!;
  if (end - pos < 6 + n + 8) return null;
  const idstr = latin1.decode(b.subarray(pos + 6, pos + 6 + n));
  const instance = dv.getUint32(pos + 6 + n);
  const version = dv.getUint32(pos + 10 + n);
  if (idstr !== RAM_IDSTR || type !== Section.START) {
    throw fail(
      `section '${idstr}' (instance ${instance}) before RAM: sgm carries only RAM as an iterable ` +
        "(block migration, dirty bitmaps, vfio and virtio-mem are refused)",
    );
  }
  if (ramSectionId >= 0) throw fail("a second RAM section START");
  if (version !== RAM_SECTION_VERSION) throw fail(`RAM section version ${version} (only 4 is known)`);
  if (id === 0) throw fail("RAM section id 0");
  const list = parseBlockList(b, dv, pos + 14 + n, end, advised, fail);
  if (list === null) return null;
  return { id, blocks: list.blocks, next: list.next };
}

/** The MEM_SIZE record of the RAM START section, then its EOS. */
function parseBlockList(
  b: Uint8Array,
  dv: DataView,
  pos: number,
  end: number,
  advised: boolean,
  fail: (message: string) => SgmError,
): { blocks: RamBlockInfo[]; next: number } | null {
  if (end - pos < 8) return null;
  const { offset: total, flags } = readRecordHeader(dv, pos);
  if (flags !== RamFlag.MEM_SIZE) throw fail(`RAM START begins with ${ramFlagName(flags)}, not MEM_SIZE`);
  pos += 8;
  let remaining = total;
  const blocks: RamBlockInfo[] = [];
  while (remaining > 0) {
    if (end - pos < 1) return null;
    const n = b[pos]!;
    if (n === 0) throw fail("RAM block with an empty name");
    if (end - pos < 1 + n + 8) return null;
    const name = latin1.decode(b.subarray(pos + 1, pos + 1 + n));
    const usedLength = readU64(dv, pos + 1 + n);
    pos += 1 + n + 8;
    if (usedLength > remaining || usedLength % TPS !== 0) {
      throw fail(`RAM block '${name}' of ${usedLength} bytes does not fit the announced total ${total}`);
    }
    remaining -= usedLength;
    // With postcopy-ram on, a block whose page size differs from the host's
    // carries it as an extra be64. It starts with a zero byte, which no
    // counted name can, and is never the EOS that ends the list.
    if (advised) {
      if (end - pos < 8) return null;
      const peek = readU64(dv, pos);
      const isNextName = b[pos] !== 0;
      const isEos = remaining === 0 && peek === RamFlag.EOS;
      if (!isNextName && !isEos) {
        throw fail(`RAM block '${name}' uses ${peek}-byte pages; sgm carries ${TPS}-byte pages only`);
      }
    }
    blocks.push({ name, usedLength });
  }
  if (end - pos < 8) return null;
  const eos = readRecordHeader(dv, pos);
  if (eos.flags !== RamFlag.EOS) {
    throw fail(`RAM block list not followed by EOS but ${ramFlagName(eos.flags)} (x-ignore-shared is not supported)`);
  }
  return { blocks, next: pos + 8 };
}

function readRecordHeader(dv: DataView, pos: number): { offset: number; flags: number } {
  const hi = dv.getUint32(pos);
  const lo = dv.getUint32(pos + 4);
  const flags = lo & RAM_FLAG_MASK;
  return { offset: hi * 0x1_0000_0000 + (lo - flags), flags };
}

function readU64(dv: DataView, pos: number): number {
  return dv.getUint32(pos) * 0x1_0000_0000 + dv.getUint32(pos + 4);
}
