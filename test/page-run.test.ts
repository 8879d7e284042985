// A scatter hashing on its reader's thread: the page records of a chunk
// wait in a PageRun and come out in the order they went in, each page with
// its own digest (checked against blake3-wasm), zero pages in their turn;
// only pages lying in the chunk itself wait. Then the whole way: a
// migration stream read in chunks of every size, from a buffer the socket
// overwrites after each, gives the records a page-by-page reader gives.

import { describe, expect, test } from "bun:test";
import { hash as blake3 } from "blake3-wasm";
import { DIGEST_BYTES, PAGE_BYTES, isZeroPage } from "../core/dedup/digest.ts";
import { PostcopyStreamWriter } from "../core/qemu/postcopy-writer.ts";
import type { ReaderHandler } from "../core/qemu/reader-handler.ts";
import { MigrationStreamReader } from "../core/qemu/stream-reader.ts";
import { PageRun, type RunSink, settlingFirst } from "../core/scatter/page-run.ts";

const digestHex = (bytes: Uint8Array) => Buffer.from(blake3(bytes) as Uint8Array).toString("hex");

/** A sink that writes down each record, with the digest it was given and the BLAKE3 of its content then. */
function recorder(lines: string[] = []): { sink: RunSink; lines: string[] } {
  const sink: RunSink = {
    page: (block, page, d, at, content) => lines.push(`page ${block}:${page} ${Buffer.from(d.subarray(at, at + DIGEST_BYTES)).toString("hex")} ${digestHex(content)}`),
    zero: (block, page) => lines.push(`zero ${block}:${page}`),
  };
  return { sink, lines };
}

/** A chunk as the stream has it: 8-byte record headers and pages, 9-byte zero records between them. */
function chunkOf(layout: string): { chunk: Uint8Array; pages: Uint8Array[] } {
  const bytes = new Uint8Array(16 + layout.length * (8 + PAGE_BYTES));
  const pages: Uint8Array[] = [];
  let at = 16;
  for (const [n, kind] of [...layout].entries()) {
    if (kind === "z") {
      at += 9;
      continue;
    }
    at += 8;
    const page = bytes.subarray(at, at + PAGE_BYTES);
    for (let i = 0; i < PAGE_BYTES; i++) page[i] = (n * 131 + i * 7) & 0xff;
    pages.push(page);
    at += PAGE_BYTES;
  }
  // the reader's chunk is a view into a larger buffer
  return { chunk: bytes.subarray(4), pages };
}

describe("PageRun", () => {
  test("pages and zero pages wait, then come out in order, each page with its own digest", () => {
    const layout = "ppzpzzppppppppppppppppppzpp";
    const { chunk, pages } = chunkOf(layout);
    const { sink, lines } = recorder();
    const run = new PageRun();
    run.begin(chunk);
    const expected: string[] = [];
    let p = 0;
    for (const [n, kind] of [...layout].entries()) {
      if (kind === "z") {
        run.page(0, n, n % 2 ? null : new Uint8Array(PAGE_BYTES), sink);
        expected.push(`zero 0:${n}`);
      } else {
        const page = pages[p++]!;
        run.page(1, n, page, sink);
        expected.push(`page 1:${n} ${digestHex(page)} ${digestHex(page)}`);
      }
    }
    expect(lines).toEqual([]);
    run.settle(sink);
    expect(lines).toEqual(expected);
    run.end();
  });

  test("a zero page with no run waiting, a page outside the chunk or with no chunk begun: applied at once, after the run", () => {
    const { chunk, pages } = chunkOf("pp");
    const { sink, lines } = recorder();
    const run = new PageRun();
    run.page(0, 0, pages[0]!, sink);
    expect(lines.length).toBe(1);
    run.begin(chunk.subarray(0, 100));
    // in the same buffer, but past the chunk the reader was given
    run.page(0, 1, pages[0]!, sink);
    run.page(0, 2, null, sink);
    expect(lines.length).toBe(3);
    run.end();
    run.begin(chunk);
    run.page(0, 3, pages[1]!, sink);
    expect(lines.length).toBe(3);
    expect(() => run.end()).toThrow("unsettled");
    // a page the reader carried over lies in its own buffer: the run goes first
    const carried = new Uint8Array(PAGE_BYTES).fill(3);
    run.page(0, 4, carried, sink);
    expect(lines.slice(3).map((l) => l.split(" ").slice(0, 2).join(" "))).toEqual(["page 0:3", "page 0:4"]);
    run.end();
    for (const line of lines) {
      const [, , digest, content] = line.split(" ");
      if (content) expect(digest).toBe(content);
    }
  });

  test("a full run is settled to take the next page", () => {
    const { chunk, pages } = chunkOf("p".repeat(130));
    const { sink, lines } = recorder();
    const run = new PageRun();
    run.begin(chunk);
    for (let n = 0; n < 129; n++) run.page(0, n, pages[n]!, sink);
    expect(lines.length).toBe(128);
    run.settle(sink);
    run.end();
    expect(lines.length).toBe(129);
    for (const line of lines) {
      const [, , digest, content] = line.split(" ");
      expect(digest).toBe(content);
    }
  });
});

describe("a stream read in chunks through a PageRun", () => {
  // a postcopy stream: pages, zero pages, pages of zeros sent whole, PINGs, discards, the switchover package, more pages
  let seed = 99;
  const random = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) >>> 8;
  const parts: Uint8Array[] = [];
  const blocks = [
    { name: "pc.ram", usedLength: PAGE_BYTES * 2000 },
    { name: "other", usedLength: PAGE_BYTES * 50 },
  ];
  const writer = new PostcopyStreamWriter({
    header: new Uint8Array([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]),
    blocks,
    ramSectionId: 2,
    sink: { write: (b: Uint8Array) => parts.push(b.slice()), bytesWritten: 0, queuedBytes: 0, bytesAccepted: 0 },
    bufferBytes: 100_000,
  });
  writer.begin();
  for (let i = 0; i < 3000; i++) {
    const b = random() % 5 === 0 ? 1 : 0;
    const p = random() % (blocks[b]!.usedLength / PAGE_BYTES);
    const kind = random() % 10;
    let data: Uint8Array | null = null;
    if (kind < 7) {
      data = new Uint8Array(PAGE_BYTES);
      for (let k = 0; k < PAGE_BYTES; k += 64) data[k] = random() & 0xff;
      data[0] = i & 0xff;
      data[1] = i >> 8;
    } else if (kind < 8) data = new Uint8Array(PAGE_BYTES);
    writer.page(b, p, data);
    if (random() % 200 === 0) writer.ping(i);
  }
  writer.discard(0, [
    [5, 10],
    [100, 3],
  ]);
  writer.packageAndRun(new Uint8Array(300).fill(7));
  for (let i = 0; i < 300; i++) {
    const d = new Uint8Array(PAGE_BYTES).fill(i + 1);
    writer.page(0, i, d);
    if (i % 50 === 0) writer.ping(i);
  }
  writer.end();
  const stream = Buffer.concat(parts);

  function logging(log: string[], onPage: ReaderHandler["onPage"]): ReaderHandler {
    return {
      onHeader: () => log.push("header"),
      onRamBlocks: () => log.push("blocks"),
      onPage,
      onRamSectionEnd: (last) => log.push(`end ${last}`),
      onCommand: (cmd, payload) => log.push(`command ${cmd} ${Buffer.from(payload).toString("hex")}`),
      onPackaged: (blob) => log.push(`package ${blob.length}`),
      onDeviceState: () => log.push("device state"),
      onEof: () => log.push("eof"),
    };
  }

  // read page by page, whole
  const reference: string[] = [];
  new MigrationStreamReader(logging(reference, (b, p, d) => reference.push(d === null || isZeroPage(d) ? `zero ${b}:${p}` : `page ${b}:${p} ${digestHex(d)} ${digestHex(d)}`))).feed(
    stream.slice(),
  );

  test.each([
    ["1 to 200 bytes", () => 1 + (random() % 200)],
    ["1 to 9000 bytes", () => 1 + (random() % 9000)],
    ["one page record each", () => PAGE_BYTES + 8],
    ["60 to 130 KB", () => 60_000 + (random() % 70_000)],
  ])("in chunks of %s, each in a buffer overwritten after it: the same records in the same order, every digest its page's", (_what, size) => {
    const got: string[] = [];
    const { sink } = recorder(got);
    const run = new PageRun();
    const reader = new MigrationStreamReader(settlingFirst(logging(got, (b, p, d) => run.page(b, p, d, sink)), () => run.settle(sink)));
    const socketBuffer = new Uint8Array(200_016);
    for (let at = 0; at < stream.length; ) {
      const n = Math.min(size(), stream.length - at);
      const offset = random() % 16;
      const chunk = socketBuffer.subarray(offset, offset + n);
      chunk.set(stream.subarray(at, at + n));
      run.begin(chunk);
      reader.feed(chunk);
      run.settle(sink);
      run.end();
      socketBuffer.fill(0xee);
      at += n;
    }
    expect(got.length).toBe(reference.length);
    expect(got).toEqual(reference);
  });
});
