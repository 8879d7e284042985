// The stream reader and the postcopy writer against a stream captured from
// a real QEMU at test time, and against broken variants of it.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { SgmError } from "../core/errors.ts";
import { Command, Section } from "../core/qemu/constants.ts";
import type { VmDescription } from "../core/qemu/device-state.ts";
import { PostcopyStreamWriter } from "../core/qemu/postcopy-writer.ts";
import type { RamBlockInfo, ReaderHandler } from "../core/qemu/reader-handler.ts";
import { MigrationStreamReader } from "../core/qemu/stream-reader.ts";
import { captureStream } from "./harness/capture.ts";
import { killAll } from "./harness/processes.ts";
import { TestVm } from "./harness/qemu.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";

interface Parsed {
  header: Uint8Array | null;
  blocks: RamBlockInfo[];
  /** Last content per "block:page" (hex of a cheap fingerprint), "zero" for zero pages. */
  pages: Map<string, string>;
  pageRecords: number;
  commands: number[];
  packaged: Uint8Array | null;
  device: Uint8Array | null;
  vmdesc: VmDescription | null;
  eof: boolean;
}

function fingerprint(data: Uint8Array): string {
  return Bun.hash.xxHash3(data).toString(16);
}

function parse(stream: Uint8Array, chunkSize: (at: number) => number): Parsed {
  const out: Parsed = { header: null, blocks: [], pages: new Map(), pageRecords: 0, commands: [], packaged: null, device: null, vmdesc: null, eof: false };
  const handler: ReaderHandler = {
    onHeader: (b) => (out.header = b.slice()),
    onRamBlocks: (b) => (out.blocks = [...b]),
    onPage: (block, page, data) => {
      out.pageRecords++;
      out.pages.set(`${block}:${page}`, data ? fingerprint(data) : "zero");
    },
    onRamSectionEnd: () => {},
    onCommand: (cmd) => out.commands.push(cmd),
    onPackaged: (blob) => (out.packaged = blob.slice()),
    onDeviceState: (bytes, vmdesc) => {
      out.device = bytes.slice();
      out.vmdesc = vmdesc;
    },
    onEof: () => (out.eof = true),
  };
  const reader = new MigrationStreamReader(handler);
  for (let at = 0; at < stream.length; ) {
    const n = Math.max(1, chunkSize(at));
    reader.feed(stream.subarray(at, at + n));
    at += n;
  }
  reader.finish();
  return out;
}

function parseError(stream: Uint8Array): SgmError {
  try {
    parse(stream, () => 65536);
  } catch (err) {
    return err as SgmError;
  }
  throw new Error("the stream parsed without error");
}

let dir: string;
let stream: Uint8Array;
let whole: Parsed;

beforeAll(async () => {
  dir = makeTempDir("stream");
  const vm = await TestVm.start({ dir, name: "capture", memMiB: 48, seed: 21 });
  await vm.waitFilled();
  stream = await captureStream(vm, dir);
  await vm.kill();
  whole = parse(stream, () => stream.length);
}, 120_000);

afterAll(async () => {
  await killAll();
  removeDir(dir);
});

describe("stream reader on a captured QEMU stream", () => {
  test("reads header, blocks, every page and the device state", () => {
    expect(whole.header!.length).toBe(26); // magic, version, pc-i440fx-7.2 configuration
    expect(whole.blocks[0]).toEqual({ name: "pc.ram", usedLength: 48 * 1024 * 1024 });
    const totalPages = whole.blocks.reduce((n, b) => n + b.usedLength / 4096, 0);
    expect(whole.pages.size).toBe(totalPages); // QEMU sends every page at least once
    expect(whole.device!.length).toBeGreaterThan(1000);
    expect(whole.device![0]).toBe(Section.FULL);
    expect(whole.vmdesc!.devices.at(-1)!.name).toBe("globalstate");
  });

  test("gives the same records however the bytes are chunked", () => {
    let seed = 12345;
    const random = () => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return seed >>> 8;
    };
    const chunkings: Array<(at: number) => number> = [
      () => 1 + (random() % 9000),
      () => 4096 + 8,
      // byte-sized chunks through the header, the block list and the first pages
      (at) => (at < 2 * 1024 * 1024 ? 1 + (random() % 17) : 65536),
    ];
    for (const chunkSize of chunkings) {
      const p = parse(stream, chunkSize);
      expect(p.pageRecords).toBe(whole.pageRecords);
      expect(p.pages).toEqual(whole.pages);
      expect(p.device).toEqual(whole.device);
      expect(p.header).toEqual(whole.header);
    }
  });

  test("a stream cut short is an error, not a hang", () => {
    const cut = stream.subarray(0, Math.floor(stream.length / 2));
    const err = parseError(cut);
    expect(err).toBeInstanceOf(SgmError);
    expect(err.kind).toBe("data");
    expect(err.message).toMatch(/^migration stream: stream ended/);
  });

  test("bad magic", () => {
    const bad = stream.slice(0, 64);
    bad[0] = 0x51;
    bad[1] = 0x00;
    expect(parseError(bad).message).toBe("migration stream: bad magic 0x5100564d (not a QEMU migration stream)");
  });

  test("unknown section type", () => {
    const bad = stream.slice();
    bad[whole.header!.length] = 0x09;
    expect(parseError(bad).message).toBe("migration stream: unknown record type 0x09");
  });

  test("oversized length field", () => {
    const bad = stream.slice(0, 64);
    new DataView(bad.buffer).setUint32(9, 0xffffffff); // machine type name length
    expect(parseError(bad).message).toBe("migration stream: machine type name of 4294967295 bytes");
  });

  test("unknown page flag", () => {
    const bad = stream.slice();
    // the first page record follows the RAM START section and the PART header
    const at = firstPageRecord(bad);
    bad[at + 6] = bad[at + 6]! | 0x04; // flag 0x400 on top of PAGE
    expect(parseError(bad).message).toMatch(/^migration stream: unknown page flag /);
  });

  test("an XBZRLE page names the capability to turn off", () => {
    const bad = stream.slice();
    const at = firstPageRecord(bad);
    bad[at + 7] = (bad[at + 7]! & ~0x0a) | 0x40;
    expect(parseError(bad).message).toBe("migration stream: XBZRLE page (turn the xbzrle capability off)");
  });
});

/** Offset of the first page record's be64 header in a captured stream. */
function firstPageRecord(s: Uint8Array): number {
  // START ram: 0x01, id, "ram", instance, version, block list, EOS, footer; then 0x02 PART + id
  const dv = new DataView(s.buffer, s.byteOffset);
  for (let i = 26; i < s.length - 16; i++) {
    if (s[i] === Section.PART && s[i - 5] === Section.FOOTER) {
      const flags = dv.getUint32(i + 5 + 4) & 0xfff;
      if (flags === 0x08 || flags === 0x02) return i + 5;
    }
  }
  throw new Error("no page record found");
}

describe("postcopy writer", () => {
  test("writes a stream the reader parses back into the same pages and device state", () => {
    const chunks: Uint8Array[] = [];
    // a sink that passes everything on at once, so the writer reuses its buffers
    const sink = {
      bytesWritten: 0,
      queuedBytes: 0,
      bytesAccepted: 0,
      write(b: Uint8Array) {
        chunks.push(b.slice());
        sink.bytesWritten += b.length;
        sink.bytesAccepted += b.length;
      },
    };
    const writer = new PostcopyStreamWriter({ header: whole.header!, blocks: whole.blocks, ramSectionId: 2, sink });
    writer.begin();
    // half the pages before switchover, the rest after, as a gather would
    const entries = [...whole.pages.entries()];
    const reader = new MigrationStreamReader({
      onHeader: () => {},
      onRamBlocks: () => {},
      onPage: (block, page, data) => {
        pagesSeen.set(`${block}:${page}`, data ? fingerprint(data) : "zero");
      },
      onRamSectionEnd: () => {},
      onCommand: (cmd) => commands.push(cmd),
      onPackaged: (blob) => (packaged = blob.slice()),
      onDeviceState: () => {},
      onEof: () => (eof = true),
    });
    const pagesSeen = new Map<string, string>();
    const commands: number[] = [];
    let packaged: Uint8Array | null = null;
    let eof = false;

    const content = contentByPage(stream);
    const half = Math.floor(entries.length / 2);
    entries.slice(0, half).forEach(([key]) => {
      const [b, p] = key.split(":").map(Number) as [number, number];
      writer.page(b, p, content.get(key) ?? null);
    });
    writer.discard(0, [[0, 1]]);
    writer.packageAndRun(whole.device!);
    entries.slice(half).forEach(([key]) => {
      const [b, p] = key.split(":").map(Number) as [number, number];
      writer.page(b, p, content.get(key) ?? null);
    });
    writer.end();
    for (const c of chunks) reader.feed(c);
    expect(reader.isComplete).toBe(true);
    expect(eof).toBe(true);
    expect(commands).toEqual([Command.OPEN_RETURN_PATH, Command.POSTCOPY_ADVISE, Command.POSTCOPY_RAM_DISCARD]);
    expect(pagesSeen).toEqual(whole.pages);
    // LISTEN, the device state byte for byte, PING(3), RUN
    const listen = [Section.COMMAND, 0, Command.POSTCOPY_LISTEN, 0, 0];
    const run = [Section.COMMAND, 0, Command.POSTCOPY_RUN, 0, 0];
    expect([...packaged!.subarray(0, 5)]).toEqual(listen);
    expect(packaged!.subarray(5, 5 + whole.device!.length)).toEqual(whole.device!);
    expect([...packaged!.subarray(packaged!.length - 5)]).toEqual(run);
  });
});

describe("postcopy writer memory", () => {
  test("pages flushed a few at a time into a sink that has not written them yet hold about their own bytes, not a buffer each", () => {
    // a destination that takes nothing yet: every write stays queued, as when QEMU is slow
    const held: Uint8Array[] = [];
    const sink = {
      bytesWritten: 0,
      queuedBytes: 0,
      bytesAccepted: 0,
      write(b: Uint8Array) {
        held.push(b);
        sink.queuedBytes += b.length;
        sink.bytesAccepted += b.length;
      },
    };
    const writer = new PostcopyStreamWriter({ header: whole.header!, blocks: whole.blocks, ramSectionId: 2, sink });
    writer.begin();
    writer.packageAndRun(whole.device!);
    const page = new Uint8Array(4096).fill(7);
    const first = whole.blocks[0]!;
    // a page at a time, as the destination asks for them
    for (let p = 0; p < 200 && p * 4096 < first.usedLength; p++) {
      writer.page(0, p, page);
      writer.flush();
    }
    const memory = new Set(held.map((b) => b.buffer));
    const holding = [...memory].reduce((n, b) => n + b.byteLength, 0);
    expect(sink.queuedBytes).toBeGreaterThan(200 * 4096);
    expect(holding).toBeLessThan(2 * sink.queuedBytes);
  });
});

function contentByPage(s: Uint8Array): Map<string, Uint8Array> {
  const map = new Map<string, Uint8Array>();
  const reader = new MigrationStreamReader({
    onHeader: () => {},
    onRamBlocks: () => {},
    onPage: (block, page, data) => {
      if (data) map.set(`${block}:${page}`, data.slice());
      else map.delete(`${block}:${page}`);
    },
    onRamSectionEnd: () => {},
    onCommand: () => {},
    onPackaged: () => {},
    onDeviceState: () => {},
    onEof: () => {},
  });
  reader.feed(s);
  return map;
}
