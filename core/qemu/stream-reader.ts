// Incremental reader of the migration stream a source QEMU sends: fed socket
// chunks as they arrive, it calls its handler once per record. Page contents
// are handed over as views into the chunk (or into a small carry buffer for
// records split across chunks), valid only during the call, so the page path
// copies nothing it does not have to.
//
// The device state that follows RAM cannot be walked without knowing every
// device's vmstate, so it is kept as opaque bytes: in precopy it runs from the
// RAM END section to the EOF byte, located through the VMDESCRIPTION record
// that follows it; in postcopy it arrives inside the PACKAGED command.

import { SgmError } from "../errors.ts";
import {
  Command,
  commandName,
  QEVM_MAGIC,
  QEVM_VERSION,
  RAM_FLAG_MASK,
  RAM_IDSTR,
  RAM_SECTION_VERSION,
  RamFlag,
  ramFlagName,
  Section,
  TPS,
} from "./constants.ts";

export interface RamBlockInfo {
  name: string;
  usedLength: number;
}

export interface ReaderHandler {
  /** Magic, version and configuration section, byte for byte. */
  onHeader(bytes: Uint8Array): void;
  /** The RAM block list of the RAM section's START. */
  onRamBlocks(blocks: RamBlockInfo[]): void;
  /** A page: its content (valid during the call only), or null when it is all zero. */
  onPage(block: number, page: number, data: Uint8Array | null): void;
  /** A RAM section ended (EOS and footer read). */
  onRamSectionEnd(last: boolean): void;
  /** A command other than PACKAGED; payload valid during the call only. */
  onCommand(cmd: number, payload: Uint8Array): void;
  /** PACKAGED: the embedded stream (LISTEN, device sections, PINGs, RUN); valid during the call only. */
  onPackaged(blob: Uint8Array): void;
  /**
   * Precopy's device state: every byte from the end of the RAM END section
   * up to (not including) the EOF byte. Called once; the stream is complete.
   */
  onDeviceState(bytes: Uint8Array, vmdesc: VmDescription | null): void;
  /** The EOF byte after the last RAM section of a postcopy stream (the stream is complete). */
  onEof(): void;
}

export interface VmDescription {
  devices: Array<{ name: string; instance_id: number }>;
}

/** Bound on buffered device state or packaged blob: far above any real VM's. */
const MAX_DEVICE_STATE = 256 * 1024 * 1024;
/** A page record plus its longest possible header. */
const MAX_PAGE_RECORD = 8 + 1 + 255 + TPS;

type Phase = "header" | "records" | "device" | "done";

const NEED_MORE = -1;
const latin1 = new TextDecoder("latin1");

export class MigrationStreamReader {
  private readonly handler: ReaderHandler;
  private phase: Phase = "header";
  private blocks: RamBlockInfo[] = [];
  private blockIndex = new Map<string, number>();
  private ramSectionId = -1;
  /** Inside a RAM PART/END section: its page records are read one by one. */
  private openSection: { id: number; last: boolean } | null = null;
  private footers: boolean | undefined;
  private advised = false;
  /** PACKAGED arrived: the source runs postcopy, and its stream ends with EOF, no device state. */
  private postcopy = false;
  /** Block of the previous page record, for RAM_SAVE_FLAG_CONTINUE. */
  private lastBlock = -1;
  private zeroFill = new Map<number, Uint8Array>();
  private bytesRead = 0;

  // the buffer being parsed: a chunk, or the carry buffer
  private b: Uint8Array = new Uint8Array(0);
  private dv: DataView = new DataView(new ArrayBuffer(0));

  // bytes of a record split across chunks
  private carry = new Uint8Array(64 * 1024);
  private carryLen = 0;

  // precopy device state and vmdesc, accumulated after RAM END
  private tail = new Uint8Array(0);
  private tailLen = 0;

  constructor(handler: ReaderHandler) {
    this.handler = handler;
  }

  /**
   * A reader for the stream of a postcopy source that resumes after its
   * channel broke (QEMU's `migrate` resume): no header, the RAM blocks and
   * section as `before` read them; recovery commands, then postcopy pages.
   */
  static resumed(handler: ReaderHandler, before: MigrationStreamReader): MigrationStreamReader {
    if (!before.postcopy) throw new SgmError("internal", "a resumed stream for a source that never switched to postcopy");
    const r = new MigrationStreamReader(handler);
    r.phase = "records";
    r.blocks = before.blocks;
    r.blockIndex = before.blockIndex;
    r.ramSectionId = before.ramSectionId;
    r.footers = before.footers;
    r.advised = true;
    r.postcopy = true;
    return r;
  }

  get totalBytes(): number {
    return this.bytesRead;
  }

  get isComplete(): boolean {
    return this.phase === "done";
  }

  get ramBlocks(): readonly RamBlockInfo[] {
    return this.blocks;
  }

  /** The source's section id for RAM, once its START was read. */
  get ramSection(): number {
    return this.ramSectionId;
  }

  feed(chunk: Uint8Array): void {
    this.bytesRead += chunk.length;
    if (this.phase === "done") {
      if (chunk.length > 0) throw this.error(`${chunk.length} bytes after the end of the stream`);
      return;
    }
    if (this.phase === "device") {
      this.appendTail(chunk, 0);
      return;
    }
    let offset = 0;
    // finish the record split across chunks, copying as few bytes as needed
    while (this.carryLen > 0 && offset < chunk.length) {
      const take = Math.min(chunk.length - offset, MAX_PAGE_RECORD);
      this.appendCarry(chunk, offset, take);
      const consumed = this.parse(this.carry, 0, this.carryLen);
      if (this.reachedDeviceState()) {
        // everything after the RAM END footer is device state
        this.appendTail(this.carry.subarray(consumed, this.carryLen), 0);
        this.carryLen = 0;
        this.appendTail(chunk, offset + take);
        return;
      }
      if (consumed === 0) {
        offset += take;
        continue;
      }
      const leftover = this.carryLen - consumed;
      if (leftover <= take) {
        // the carried record is done; resume in the chunk itself
        offset += take - leftover;
        this.carryLen = 0;
      } else {
        this.carry.copyWithin(0, consumed, this.carryLen);
        this.carryLen = leftover;
        offset += take;
      }
    }
    if (offset >= chunk.length) return;
    const consumed = this.parse(chunk, offset, chunk.length);
    if (this.reachedDeviceState()) {
      this.appendTail(chunk, consumed);
      return;
    }
    if (consumed < chunk.length) this.appendCarry(chunk, consumed, chunk.length - consumed);
  }

  /**
   * The source closed the stream. Precopy without a return path ends this
   * way; anywhere else it means the stream was cut short.
   */
  finish(): void {
    if (this.phase === "done") return;
    if (this.phase === "device") {
      const t = this.tail.subarray(0, this.tailLen);
      // suppress-vmdesc machines end with the EOF byte alone
      if (this.tailLen > 0 && t[this.tailLen - 1] === Section.EOF && !this.findVmdesc()) {
        this.phase = "done";
        this.handler.onDeviceState(t.subarray(0, this.tailLen - 1), null);
        return;
      }
      this.checkTailComplete();
      if (this.isComplete) return;
      throw this.error(`stream ended inside the device state (${this.tailLen} bytes after RAM)`);
    }
    throw this.error(`stream ended in the middle of ${this.phase === "header" ? "the header" : "a record"}`);
  }

  // ---- parsing -------------------------------------------------------------

  /** A method, not an inline comparison: parse() moves the phase behind the compiler's back. */
  private reachedDeviceState(): boolean {
    return this.phase === "device";
  }

  /** Parses whole records from b[pos..end); returns the offset after the last one. */
  private parse(b: Uint8Array, pos: number, end: number): number {
    this.b = b;
    this.dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
    while (pos < end && this.phase !== "device" && this.phase !== "done") {
      const next = this.phase === "header" ? this.parseHeader(pos, end) : this.parseRecord(pos, end);
      if (next === NEED_MORE) break;
      pos = next;
    }
    return pos;
  }

  private parseHeader(pos: number, end: number): number {
    const start = pos;
    if (end - pos < 9) return NEED_MORE;
    const magic = this.dv.getUint32(pos);
    if (magic !== QEVM_MAGIC) throw this.error(`bad magic 0x${magic.toString(16).padStart(8, "0")} (not a QEMU migration stream)`);
    const version = this.dv.getUint32(pos + 4);
    if (version !== QEVM_VERSION) throw this.error(`unsupported stream version ${version}`);
    pos += 8;
    if (this.b[pos] === Section.CONFIGURATION) {
      if (end - pos < 5) return NEED_MORE;
      const nameLen = this.dv.getUint32(pos + 1);
      if (nameLen > 256) throw this.error(`machine type name of ${nameLen} bytes`);
      pos += 5 + nameLen;
      // subsections: 0x05, counted name, be32 version, body known by name
      for (;;) {
        if (pos >= end) return NEED_MORE;
        if (this.b[pos] !== Section.SUBSECTION) break;
        if (end - pos < 2) return NEED_MORE;
        const n = this.b[pos + 1]!;
        if (end - pos < 2 + n + 4) return NEED_MORE;
        const name = latin1.decode(this.b.subarray(pos + 2, pos + 2 + n));
        pos += 2 + n + 4;
        const bodyLen = this.configurationBodyLength(name, pos, end);
        if (bodyLen === NEED_MORE) return NEED_MORE;
        pos += bodyLen;
      }
    }
    this.handler.onHeader(this.b.slice(start, pos));
    this.phase = "records";
    return pos;
  }

  private configurationBodyLength(name: string, pos: number, end: number): number {
    switch (name) {
      case "configuration/target-page-bits":
        return end - pos < 4 ? NEED_MORE : 4;
      case "configuration/uuid":
        return end - pos < 16 ? NEED_MORE : 16;
      case "configuration/capabilities": {
        if (end - pos < 4) return NEED_MORE;
        const count = this.dv.getUint32(pos);
        if (count > 64) throw this.error(`configuration lists ${count} capabilities`);
        let p = pos + 4;
        for (let i = 0; i < count; i++) {
          if (p >= end) return NEED_MORE;
          p += 1 + this.b[p]!;
        }
        return p > end ? NEED_MORE : p - pos;
      }
      default:
        throw this.error(`unknown configuration subsection '${name}'`);
    }
  }

  private parseRecord(pos: number, end: number): number {
    if (this.openSection) return this.parseRamRecord(pos, end, this.openSection);
    const type = this.b[pos]!;
    switch (type) {
      case Section.START:
      case Section.FULL:
        return this.parseSectionStart(pos, end, type);
      case Section.PART:
      case Section.END: {
        if (end - pos < 5) return NEED_MORE;
        const id = this.dv.getUint32(pos + 1);
        if (id !== this.ramSectionId) throw this.error(`section ${type === Section.PART ? "PART" : "END"} for unknown section id ${id}`);
        this.openSection = { id, last: type === Section.END };
        return pos + 5;
      }
      case Section.COMMAND:
        return this.parseCommand(pos, end);
      case Section.EOF:
        if (!this.postcopy) throw this.error("EOF before the device state");
        this.phase = "done";
        this.handler.onEof();
        return pos + 1;
      default:
        throw this.error(`unknown record type 0x${type.toString(16).padStart(2, "0")}`);
    }
  }

  private parseSectionStart(pos: number, end: number, type: number): number {
    if (end - pos < 6) return NEED_MORE;
    const id = this.dv.getUint32(pos + 1);
    const n = this.b[pos + 5]!;
    if (end - pos < 6 + n + 8) return NEED_MORE;
    const idstr = latin1.decode(this.b.subarray(pos + 6, pos + 6 + n));
    const instance = this.dv.getUint32(pos + 6 + n);
    const version = this.dv.getUint32(pos + 10 + n);
    if (idstr !== RAM_IDSTR || type !== Section.START) {
      throw this.error(
        `section '${idstr}' (instance ${instance}) before RAM: sgm carries only RAM as an iterable ` +
          "(block migration, dirty bitmaps, vfio and virtio-mem are refused)",
      );
    }
    if (this.ramSectionId >= 0) throw this.error("a second RAM section START");
    if (version !== RAM_SECTION_VERSION) throw this.error(`RAM section version ${version} (only 4 is known)`);
    if (id === 0) throw this.error("RAM section id 0");
    const afterBlocks = this.parseBlockList(pos + 14 + n, end);
    if (afterBlocks === NEED_MORE) return NEED_MORE;
    const afterFooter = this.parseFooter(afterBlocks, end, id);
    if (afterFooter === NEED_MORE) return NEED_MORE;
    this.ramSectionId = id;
    this.handler.onRamBlocks(this.blocks);
    return afterFooter;
  }

  /** The MEM_SIZE record of the RAM START section, then its EOS. */
  private parseBlockList(pos: number, end: number): number {
    if (end - pos < 8) return NEED_MORE;
    const { offset: total, flags } = this.readRecordHeader(pos);
    if (flags !== RamFlag.MEM_SIZE) throw this.error(`RAM START begins with ${ramFlagName(flags)}, not MEM_SIZE`);
    pos += 8;
    let remaining = total;
    const blocks: RamBlockInfo[] = [];
    while (remaining > 0) {
      if (end - pos < 1) return NEED_MORE;
      const n = this.b[pos]!;
      if (n === 0) throw this.error("RAM block with an empty name");
      if (end - pos < 1 + n + 8) return NEED_MORE;
      const name = latin1.decode(this.b.subarray(pos + 1, pos + 1 + n));
      const usedLength = this.readU64(pos + 1 + n);
      pos += 1 + n + 8;
      if (usedLength > remaining || usedLength % TPS !== 0) {
        throw this.error(`RAM block '${name}' of ${usedLength} bytes does not fit the announced total ${total}`);
      }
      remaining -= usedLength;
      // With postcopy-ram on, a block whose page size differs from the host's
      // carries it as an extra be64. It starts with a zero byte, which no
      // counted name can, and is never the EOS that ends the list.
      if (this.advised) {
        if (end - pos < 8) return NEED_MORE;
        const peek = this.readU64(pos);
        const isNextName = this.b[pos] !== 0;
        const isEos = remaining === 0 && peek === RamFlag.EOS;
        if (!isNextName && !isEos) {
          throw this.error(`RAM block '${name}' uses ${peek}-byte pages; sgm carries ${TPS}-byte pages only`);
        }
      }
      blocks.push({ name, usedLength });
    }
    if (end - pos < 8) return NEED_MORE;
    const eos = this.readRecordHeader(pos);
    if (eos.flags !== RamFlag.EOS) {
      throw this.error(`RAM block list not followed by EOS but ${ramFlagName(eos.flags)} (x-ignore-shared is not supported)`);
    }
    this.blocks = blocks;
    this.blockIndex = new Map(blocks.map((b, i) => [b.name, i]));
    return pos + 8;
  }

  /** One page record, or the EOS and footer that close the section. */
  private parseRamRecord(pos: number, end: number, section: { id: number; last: boolean }): number {
    if (end - pos < 8) return NEED_MORE;
    const hi = this.dv.getUint32(pos);
    const lo = this.dv.getUint32(pos + 4);
    const flags = lo & RAM_FLAG_MASK;
    const base = flags & ~RamFlag.CONTINUE;
    if (base === RamFlag.EOS) {
      const next = this.parseFooter(pos + 8, end, section.id);
      if (next === NEED_MORE) return NEED_MORE;
      this.openSection = null;
      this.handler.onRamSectionEnd(section.last);
      // a source with postcopy-ram on that converged in precopy ends like any precopy stream
      if (section.last && !this.postcopy) this.phase = "device";
      return next;
    }
    if (base !== RamFlag.PAGE && base !== RamFlag.ZERO) throw this.unsupportedRecord(flags);
    const offset = hi * 0x1_0000_0000 + (lo - flags);
    let p = pos + 8;
    let block = this.lastBlock;
    if (!(flags & RamFlag.CONTINUE)) {
      if (end - p < 1) return NEED_MORE;
      const n = this.b[p]!;
      if (end - p < 1 + n) return NEED_MORE;
      block = this.lookupBlock(p + 1, n);
      p += 1 + n;
    } else if (block < 0) {
      throw this.error("page record with CONTINUE but no previous block");
    }
    const info = this.blocks[block]!;
    if (offset >= info.usedLength) {
      throw this.error(`page at offset 0x${offset.toString(16)} beyond RAM block '${info.name}' (${info.usedLength} bytes)`);
    }
    if (base === RamFlag.PAGE) {
      if (end - p < TPS) return NEED_MORE;
      this.lastBlock = block;
      this.handler.onPage(block, offset / TPS, this.b.subarray(p, p + TPS));
      return p + TPS;
    }
    if (end - p < 1) return NEED_MORE;
    const fill = this.b[p]!;
    this.lastBlock = block;
    this.handler.onPage(block, offset / TPS, fill === 0 ? null : this.filledPage(fill));
    return p + 1;
  }

  private parseFooter(pos: number, end: number, id: number): number {
    if (this.footers === false) return pos;
    if (end - pos < 1) return NEED_MORE;
    if (this.b[pos] !== Section.FOOTER) {
      if (this.footers === undefined) {
        // machine types up to 2.3 send no footers; decide on the first section
        this.footers = false;
        return pos;
      }
      throw this.error(`missing section footer for section ${id}`);
    }
    if (end - pos < 5) return NEED_MORE;
    const got = this.dv.getUint32(pos + 1);
    if (got !== id) throw this.error(`section footer for section ${got}, expected ${id}`);
    this.footers = true;
    return pos + 5;
  }

  private parseCommand(pos: number, end: number): number {
    if (end - pos < 5) return NEED_MORE;
    const cmd = this.dv.getUint16(pos + 1);
    const len = this.dv.getUint16(pos + 3);
    if (end - pos < 5 + len) return NEED_MORE;
    const payload = this.b.subarray(pos + 5, pos + 5 + len);
    switch (cmd) {
      case Command.OPEN_RETURN_PATH:
      case Command.PING:
      case Command.POSTCOPY_RAM_DISCARD:
      case Command.SWITCHOVER_START:
        break;
      case Command.RECV_BITMAP:
      case Command.POSTCOPY_RESUME:
        if (!this.postcopy) throw this.error(`${commandName(cmd)} outside postcopy`);
        break;
      case Command.POSTCOPY_ADVISE:
        if (len !== 16) throw this.error(`POSTCOPY_ADVISE of ${len} bytes (dirty-bitmap-only postcopy is not supported)`);
        this.advised = true;
        break;
      case Command.PACKAGED: {
        if (len !== 4) throw this.error(`PACKAGED command of ${len} bytes`);
        const blobLen = this.dv.getUint32(pos + 5);
        if (blobLen > MAX_DEVICE_STATE) throw this.error(`PACKAGED blob of ${blobLen} bytes`);
        if (end - pos < 9 + blobLen) {
          this.reserveCarry(9 + blobLen);
          return NEED_MORE;
        }
        this.lastBlock = -1; // the source resets it at the switch to postcopy
        this.postcopy = true;
        this.handler.onPackaged(this.b.subarray(pos + 9, pos + 9 + blobLen));
        return pos + 9 + blobLen;
      }
      default:
        throw this.error(`unsupported command ${commandName(cmd)}`);
    }
    this.handler.onCommand(cmd, payload);
    return pos + 5 + len;
  }

  // ---- precopy device state ----------------------------------------------

  private appendTail(src: Uint8Array, from: number): void {
    const n = src.length - from;
    if (n <= 0) {
      this.checkTailComplete();
      return;
    }
    if (this.tailLen + n > MAX_DEVICE_STATE) throw this.error(`device state larger than ${MAX_DEVICE_STATE} bytes`);
    if (this.tailLen + n > this.tail.length) {
      const grown = new Uint8Array(Math.max(this.tailLen + n, this.tail.length * 2, 256 * 1024));
      grown.set(this.tail.subarray(0, this.tailLen));
      this.tail = grown;
    }
    this.tail.set(src.subarray(from), this.tailLen);
    this.tailLen += n;
    this.checkTailComplete();
  }

  /** The precopy stream is complete once it ends in EOF, VMDESCRIPTION, len, JSON. */
  private checkTailComplete(): void {
    if (this.phase !== "device" || this.tailLen === 0 || this.tail[this.tailLen - 1] !== 0x7d /* } */) return;
    const found = this.findVmdesc();
    if (!found) return;
    const device = this.tail.subarray(0, found.q - 1);
    this.validateDeviceState(device, found.vmdesc);
    this.phase = "done";
    this.handler.onDeviceState(device, found.vmdesc);
  }

  private findVmdesc(): { q: number; vmdesc: VmDescription } | null {
    const t = this.tail;
    const len = this.tailLen;
    const dv = new DataView(t.buffer, t.byteOffset, len);
    for (let q = len - 7; q >= 1; q--) {
      if (t[q] !== Section.VMDESCRIPTION || t[q - 1] !== Section.EOF || t[q + 5] !== 0x7b /* { */) continue;
      if (dv.getUint32(q + 1) !== len - q - 5) continue;
      try {
        const vmdesc = JSON.parse(latin1.decode(t.subarray(q + 5, len))) as VmDescription;
        if (Array.isArray(vmdesc.devices)) return { q, vmdesc };
      } catch {
        // a chance match inside device data; keep looking
      }
    }
    return null;
  }

  /** Walks the FULL sections along the vmdesc's device list, to be sure where they end. */
  private validateDeviceState(device: Uint8Array, vmdesc: VmDescription): void {
    if (device.length === 0 || device[0] !== Section.FULL) {
      throw this.error("device state does not start with a FULL section");
    }
    const dv = new DataView(device.buffer, device.byteOffset, device.length);
    let pos = 0;
    for (let i = 0; i < vmdesc.devices.length; i++) {
      const want = vmdesc.devices[i]!;
      if (device[pos] !== Section.FULL || pos + 6 > device.length) throw this.error(`device section ${i} ('${want.name}') is not a FULL section`);
      const id = dv.getUint32(pos + 1);
      const n = device[pos + 5]!;
      const name = latin1.decode(device.subarray(pos + 6, pos + 6 + n));
      const instance = dv.getUint32(pos + 6 + n);
      if (name !== want.name || instance !== want.instance_id) {
        throw this.error(`device section ${i} is '${name}' #${instance}, the description says '${want.name}' #${want.instance_id}`);
      }
      const footer = [Section.FOOTER, (id >>> 24) & 0xff, (id >>> 16) & 0xff, (id >>> 8) & 0xff, id & 0xff];
      const next = vmdesc.devices[i + 1];
      let found = -1;
      for (let f = device.indexOf(Section.FOOTER, pos + 14 + n); f >= 0; f = device.indexOf(Section.FOOTER, f + 1)) {
        if (!footer.every((byte, k) => device[f + k] === byte)) continue;
        const after = f + 5;
        if (next === undefined ? after === device.length : device[after] === Section.FULL && this.sectionNameAt(device, after) === next.name) {
          found = after;
          break;
        }
      }
      if (found < 0) throw this.error(`cannot find the end of device section '${want.name}'`);
      pos = found;
    }
    if (pos !== device.length) throw this.error(`${device.length - pos} bytes of device state beyond the described devices`);
  }

  private sectionNameAt(b: Uint8Array, pos: number): string {
    const n = b[pos + 5];
    return n === undefined ? "" : latin1.decode(b.subarray(pos + 6, pos + 6 + n));
  }

  // ---- helpers -------------------------------------------------------------

  private lookupBlock(pos: number, n: number): number {
    const last = this.blocks[this.lastBlock];
    // the common case repeats the previous block's name
    if (last && last.name.length === n) {
      let same = true;
      for (let i = 0; i < n; i++) {
        if (this.b[pos + i] !== last.name.charCodeAt(i)) {
          same = false;
          break;
        }
      }
      if (same) return this.lastBlock;
    }
    const name = latin1.decode(this.b.subarray(pos, pos + n));
    const index = this.blockIndex.get(name);
    if (index === undefined) throw this.error(`page for unknown RAM block '${name}'`);
    return index;
  }

  private readRecordHeader(pos: number): { offset: number; flags: number } {
    const hi = this.dv.getUint32(pos);
    const lo = this.dv.getUint32(pos + 4);
    const flags = lo & RAM_FLAG_MASK;
    return { offset: hi * 0x1_0000_0000 + (lo - flags), flags };
  }

  private readU64(pos: number): number {
    return this.dv.getUint32(pos) * 0x1_0000_0000 + this.dv.getUint32(pos + 4);
  }

  private filledPage(fill: number): Uint8Array {
    let page = this.zeroFill.get(fill);
    if (!page) {
      page = new Uint8Array(TPS).fill(fill);
      this.zeroFill.set(fill, page);
    }
    return page;
  }

  private appendCarry(src: Uint8Array, from: number, n: number): void {
    this.reserveCarry(this.carryLen + n);
    this.carry.set(src.subarray(from, from + n), this.carryLen);
    this.carryLen += n;
  }

  private reserveCarry(n: number): void {
    if (n <= this.carry.length) return;
    const grown = new Uint8Array(Math.max(n, this.carry.length * 2));
    grown.set(this.carry.subarray(0, this.carryLen));
    this.carry = grown;
  }

  private unsupportedRecord(flags: number): SgmError {
    const base = flags & ~RamFlag.CONTINUE;
    const why: Record<number, string> = {
      [RamFlag.XBZRLE]: "XBZRLE page (turn the xbzrle capability off)",
      [RamFlag.COMPRESS_PAGE]: "compressed page (turn the compress capability off)",
      [RamFlag.HOOK]: "RDMA hook record (RDMA migration is not supported)",
      [RamFlag.MULTIFD_FLUSH]: "multifd flush record (turn multifd off)",
      [RamFlag.MEM_SIZE]: "MEM_SIZE record outside the RAM START section",
      [RamFlag.FULL]: "obsolete FULL page record",
    };
    return this.error(why[base] ?? `unknown page flag ${ramFlagName(flags)}`);
  }

  private error(message: string): SgmError {
    this.phase = "done";
    return new SgmError("data", `migration stream: ${message}`);
  }
}
