// Writes the stream a destination QEMU expects from a postcopy source:
// header, return path, POSTCOPY_ADVISE, the RAM block list, precopy-phase
// pages, then at switchover the discards, the device state packaged with
// LISTEN and RUN, postcopy pages, and the end. It only encodes; what to send
// when (and never a page twice after LISTEN) is the caller's business.
//
// Bytes accumulate in an output buffer handed to `sink` on flush() or when
// it fills; the buffer is used again once the sink has handed it off.

import { copyBytes } from "../dedup/digest.ts";
import { SgmError } from "../errors.ts";
import { RecycledBuffers } from "../net/recycled-buffers.ts";
import { Command, RAM_IDSTR, RAM_SECTION_VERSION, RamFlag, Section, TPS } from "./constants.ts";
import type { RamBlockInfo } from "./stream-reader.ts";
import { recvBitmapPayload } from "./postcopy-recovery.ts";

/** A socket-like sink: takes bytes in order, and counts what it has passed on. */
export interface ByteSink {
  write(bytes: Uint8Array): void;
  /** Bytes handed to the kernel so far. */
  readonly bytesWritten: number;
  /** Bytes taken and not yet handed to the kernel. */
  readonly queuedBytes: number;
  /** Bytes taken in all: where the last write ends in the stream. */
  readonly bytesAccepted: number;
}

export interface PostcopyWriterOptions {
  /** Magic, version and configuration, as the source sent them. */
  header: Uint8Array;
  blocks: readonly RamBlockInfo[];
  /** Section id for RAM; the source's own works. Never 0. */
  ramSectionId: number;
  /** OR of the destination's RAM block page sizes (4096 without huge pages). */
  pageSizeSummary?: number;
  sink: ByteSink;
  /** Output buffer size; a flush happens when it fills. */
  bufferBytes?: number;
}

/** Ping values with a meaning for the caller. */
export const PING_DEVICE_LOADED = 3;

const MAX_DISCARD_RANGES = 1000; // be16 command length: 3 + name + 16 * n must stay below 65536
const encoder = new TextEncoder();

type Stage = "fresh" | "precopy" | "postcopy" | "ended";

export class PostcopyStreamWriter {
  private readonly blocks: readonly RamBlockInfo[];
  private readonly names: Uint8Array[];
  private readonly sectionId: number;
  private readonly sink: ByteSink;
  private readonly bufferBytes: number;
  private readonly header: Uint8Array;
  private readonly pageSizeSummary: number;
  private readonly buffers: RecycledBuffers;
  private out: Uint8Array;
  private dv: DataView;
  private len = 0;
  private sectionOpen = false;
  private sectionBlock = -1;
  private stage: Stage = "fresh";
  /** Bytes written in total, for reports. */
  written = 0;

  constructor(options: PostcopyWriterOptions) {
    if (options.ramSectionId <= 0) throw new SgmError("internal", "RAM section id must be positive");
    this.blocks = options.blocks;
    this.names = options.blocks.map((b) => encoder.encode(b.name));
    this.sectionId = options.ramSectionId;
    this.sink = options.sink;
    this.header = options.header;
    this.pageSizeSummary = options.pageSizeSummary ?? TPS;
    this.bufferBytes = options.bufferBytes ?? 256 * 1024;
    this.buffers = new RecycledBuffers(this.bufferBytes + TPS + 512, () => this.sink.bytesWritten);
    this.out = this.buffers.acquire();
    this.dv = new DataView(this.out.buffer);
  }

  get isPostcopy(): boolean {
    return this.stage === "postcopy";
  }

  /** Header, return path, ADVISE and the RAM START section. */
  begin(): void {
    this.expect("fresh", "begin");
    this.bytes(this.header);
    this.command(Command.OPEN_RETURN_PATH, new Uint8Array(0));
    const advise = new Uint8Array(16);
    const adv = new DataView(advise.buffer);
    adv.setUint32(0, Math.floor(this.pageSizeSummary / 0x1_0000_0000));
    adv.setUint32(4, this.pageSizeSummary >>> 0);
    adv.setUint32(12, TPS);
    this.command(Command.POSTCOPY_ADVISE, advise);

    const idstr = encoder.encode(RAM_IDSTR);
    this.reserve(14 + idstr.length);
    this.u8(Section.START);
    this.u32(this.sectionId);
    this.u8(idstr.length);
    this.bytes(idstr);
    this.u32(0);
    this.u32(RAM_SECTION_VERSION);
    const total = this.blocks.reduce((sum, b) => sum + b.usedLength, 0);
    this.u64(total + RamFlag.MEM_SIZE);
    this.blocks.forEach((block, i) => {
      this.reserve(1 + this.names[i]!.length + 8);
      this.u8(this.names[i]!.length);
      this.bytes(this.names[i]!);
      this.u64(block.usedLength);
    });
    this.reserve(13);
    this.u64(RamFlag.EOS);
    this.footer();
    this.stage = "precopy";
  }

  /** A page, its content data[dataAt .. dataAt + 4096); null content means all zero. */
  page(block: number, page: number, data: Uint8Array | null, dataAt = 0): void {
    if (this.stage !== "precopy" && this.stage !== "postcopy") this.expect("precopy", "page");
    if (!this.sectionOpen) this.openSection();
    const named = this.sectionBlock !== block;
    const name = this.names[block]!;
    this.reserve(8 + 1 + name.length + (data ? TPS : 1));
    const flags = (data ? RamFlag.PAGE : RamFlag.ZERO) | (named ? 0 : RamFlag.CONTINUE);
    this.u64(page * TPS + flags);
    if (named) {
      this.u8(name.length);
      this.bytes(name);
      this.sectionBlock = block;
    }
    if (data) {
      copyBytes(data, dataAt, this.out, this.len, TPS);
      this.len += TPS;
    } else {
      this.u8(0);
    }
    if (this.len >= this.bufferBytes) this.flush();
  }

  /**
   * POSTCOPY_RAM_DISCARD for ranges of whole pages of one block, as
   * [firstPage, pageCount] pairs.
   */
  discard(block: number, ranges: ReadonlyArray<readonly [number, number]>): void {
    this.expect("precopy", "discard");
    this.closeSection();
    const name = this.names[block]!;
    for (let i = 0; i < ranges.length; i += MAX_DISCARD_RANGES) {
      const part = ranges.slice(i, i + MAX_DISCARD_RANGES);
      const payload = new Uint8Array(3 + name.length + 16 * part.length);
      const dv = new DataView(payload.buffer);
      payload[0] = 0; // version
      payload[1] = name.length;
      payload.set(name, 2);
      payload[2 + name.length] = 0; // terminator
      let p = 3 + name.length;
      for (const [first, count] of part) {
        setU64(dv, p, first * TPS);
        setU64(dv, p + 8, count * TPS);
        p += 16;
      }
      this.command(Command.POSTCOPY_RAM_DISCARD, payload);
    }
  }

  /**
   * A fresh channel to a destination in postcopy-paused (postcopy
   * recovery): no header, the stream goes on as postcopy.
   */
  resumeChannel(): void {
    this.expect("fresh", "resumeChannel");
    this.stage = "postcopy";
    this.sectionBlock = -1;
  }

  /** Asks the destination for a block's received bitmap (RECV_BITMAP). */
  askReceived(block: number): void {
    this.expect("postcopy", "askReceived");
    this.closeSection();
    this.command(Command.RECV_BITMAP, recvBitmapPayload(this.blocks[block]!.name));
  }

  /** POSTCOPY_RESUME: the destination acks and takes pages again. */
  resumePostcopy(): void {
    this.expect("postcopy", "resumePostcopy");
    this.closeSection();
    this.command(Command.POSTCOPY_RESUME, new Uint8Array(0));
    this.flush();
  }

  ping(value: number): void {
    this.closeSection();
    const payload = new Uint8Array(4);
    new DataView(payload.buffer).setUint32(0, value);
    this.command(Command.PING, payload);
  }

  /**
   * The switchover: PACKAGED holding LISTEN, the device state, a PING the
   * destination answers once it has loaded the devices, and RUN.
   */
  packageAndRun(deviceState: Uint8Array): void {
    this.expect("precopy", "packageAndRun");
    this.closeSection();
    const listen = commandBytes(Command.POSTCOPY_LISTEN, new Uint8Array(0));
    const ping = new Uint8Array(4);
    new DataView(ping.buffer).setUint32(0, PING_DEVICE_LOADED);
    const pingBytes = commandBytes(Command.PING, ping);
    const run = commandBytes(Command.POSTCOPY_RUN, new Uint8Array(0));
    const blobLen = listen.length + deviceState.length + pingBytes.length + run.length;
    const lenBytes = new Uint8Array(4);
    new DataView(lenBytes.buffer).setUint32(0, blobLen);
    this.command(Command.PACKAGED, lenBytes);
    this.bytes(listen);
    this.bytes(deviceState);
    this.bytes(pingBytes);
    this.bytes(run);
    this.stage = "postcopy";
    // the previous block is forgotten across the switch
    this.sectionBlock = -1;
    this.flush();
  }

  /** Last RAM section, then EOF: the destination completes. */
  end(): void {
    this.expect("postcopy", "end");
    this.closeSection();
    this.reserve(19);
    this.u8(Section.END);
    this.u32(this.sectionId);
    this.u64(RamFlag.EOS);
    this.footer();
    this.u8(Section.EOF);
    this.stage = "ended";
    this.flush();
  }

  /** Closes the open section and hands everything buffered to the sink. */
  flush(): void {
    this.closeSection();
    if (this.len === 0) return;
    this.written += this.len;
    if (this.len <= this.bufferBytes / 2) {
      // A buffer is kept until its bytes leave. Flushed a few pages at a
      // time (pages the destination asks for, pages from relays) each took
      // a whole buffer: the gather of a 512 MiB VM made 255 to 504 of them,
      // 64 to 128 MiB. A small fill leaves as a copy; the buffer fills on.
      this.sink.write(this.out.slice(0, this.len));
      this.len = 0;
      return;
    }
    const full = this.out;
    this.sink.write(full.subarray(0, this.len));
    // a buffer grown for a large device state is not worth keeping
    if (full.length <= 2 * (this.bufferBytes + TPS + 512)) this.buffers.queued(full, this.sink.bytesAccepted);
    this.out = this.buffers.acquire();
    this.dv = new DataView(this.out.buffer);
    this.len = 0;
  }

  // ---- encoding helpers ------------------------------------------------------

  private openSection(): void {
    this.reserve(5);
    this.u8(Section.PART);
    this.u32(this.sectionId);
    this.sectionOpen = true;
    this.sectionBlock = -1;
  }

  private closeSection(): void {
    if (!this.sectionOpen) return;
    this.reserve(13);
    this.u64(RamFlag.EOS);
    this.footer();
    this.sectionOpen = false;
  }

  private footer(): void {
    this.u8(Section.FOOTER);
    this.u32(this.sectionId);
  }

  private command(cmd: number, payload: Uint8Array): void {
    this.bytes(commandBytes(cmd, payload));
  }

  private expect(stage: Stage, what: string): void {
    if (this.stage !== stage) throw new SgmError("internal", `postcopy writer: ${what} in stage ${this.stage}`);
  }

  private reserve(n: number): void {
    if (this.len + n <= this.out.length) return;
    const grown = new Uint8Array(Math.max(this.out.length * 2, this.len + n));
    grown.set(this.out.subarray(0, this.len));
    this.out = grown;
    this.dv = new DataView(grown.buffer);
  }

  private bytes(b: Uint8Array): void {
    this.reserve(b.length);
    this.out.set(b, this.len);
    this.len += b.length;
  }

  private u8(v: number): void {
    this.out[this.len++] = v;
  }

  private u32(v: number): void {
    this.dv.setUint32(this.len, v);
    this.len += 4;
  }

  private u64(v: number): void {
    setU64(this.dv, this.len, v);
    this.len += 8;
  }
}

function setU64(dv: DataView, at: number, v: number): void {
  dv.setUint32(at, Math.floor(v / 0x1_0000_0000));
  dv.setUint32(at + 4, v >>> 0);
}

function commandBytes(cmd: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(5 + payload.length);
  const dv = new DataView(out.buffer);
  out[0] = Section.COMMAND;
  dv.setUint16(1, cmd);
  dv.setUint16(3, payload.length);
  out.set(payload, 5);
  return out;
}
