// Incremental reader of the migration stream a source QEMU sends: fed socket
// chunks as they arrive, it calls its handler once per record. Page contents
// are handed over as views into the chunk (or into a small carry buffer for
// records split across chunks), valid only during the call, so the page path
// copies nothing it does not have to.
//
// The device state that follows RAM cannot be walked without knowing every
// device's vmstate, so it is kept as opaque bytes: in precopy it runs from the
// RAM END section to the EOF byte, located through the VMDESCRIPTION record
// that follows it (device-state.ts); in postcopy it arrives inside the
// PACKAGED command.

import { SgmError } from "../errors.ts";
import { Command, commandName, RAM_FLAG_MASK, RamFlag, ramFlagName, Section, TPS } from "./constants.ts";
import { DeviceStateTail, MAX_DEVICE_STATE } from "./device-state.ts";
import { parseRamSectionStart } from "./ram-section-start.ts";
import type { RamBlockInfo, ReaderHandler } from "./reader-handler.ts";
import { parseStreamHeader } from "./stream-header.ts";

// the block list's type, for the many modules that import it from here
export type { RamBlockInfo } from "./reader-handler.ts";

/** A page record plus its longest possible header. */
const MAX_PAGE_RECORD = 8 + 1 + 255 + TPS;

type Phase = "header" | "records" | "device" | "done";

const NEED_MORE = -1;
const latin1 = new TextDecoder("latin1");

export class MigrationStreamReader {
  private readonly handler: ReaderHandler;
  /** The helper modules throw through this, so that their errors end the stream too. */
  private readonly fail = (message: string): SgmError => this.error(message);
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
  private readonly tail = new DeviceStateTail(this.fail);

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
      const bare = this.tail.withoutVmdesc();
      if (bare) {
        this.phase = "done";
        this.handler.onDeviceState(bare, null);
        return;
      }
      this.checkTailComplete();
      if (this.isComplete) return;
      throw this.error(`stream ended inside the device state (${this.tail.length} bytes after RAM)`);
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
    const next = parseStreamHeader(this.b, pos, end, this.fail);
    if (next === null) return NEED_MORE;
    this.handler.onHeader(this.b.slice(pos, next));
    this.phase = "records";
    return next;
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
    const start = parseRamSectionStart(this.b, pos, end, type, this.ramSectionId, this.advised, this.fail);
    if (start === null) return NEED_MORE;
    this.blocks = start.blocks;
    this.blockIndex = new Map(start.blocks.map((b, i) => [b.name, i]));
    const afterFooter = this.parseFooter(start.next, end, start.id);
    if (afterFooter === NEED_MORE) return NEED_MORE;
    this.ramSectionId = start.id;
    this.handler.onRamBlocks(this.blocks);
    return afterFooter;
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
    this.tail.append(src, from);
    this.checkTailComplete();
  }

  private checkTailComplete(): void {
    // feed() may append twice in one call; bytes after a completed stream complete nothing
    if (this.phase !== "device") return;
    const found = this.tail.complete();
    if (!found) return;
    this.phase = "done";
    this.handler.onDeviceState(found.device, found.vmdesc);
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
