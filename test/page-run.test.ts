// A scatter hashing on its reader's thread: the page records of a chunk
// wait in a PageRun and come out in the order they went in, each page with
// its own SHA-256 (checked against node:crypto), zero pages in their turn;
// only pages lying in the chunk itself may wait.

import { describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { DIGEST_BYTES, PAGE_BYTES } from "../core/dedup/digest.ts";
import { PageRun, type RunSink } from "../core/scatter/page-run.ts";

function recorder(): { sink: RunSink; lines: string[] } {
  const lines: string[] = [];
  const sink: RunSink = {
    page: (block, page, d, at, content) =>
      lines.push(`page ${block}:${page} ${Buffer.from(d.subarray(at, at + DIGEST_BYTES)).toString("hex")} ${createHash("sha256").update(content).digest("hex")}`),
    zero: (block, page) => lines.push(`zero ${block}:${page}`),
  };
  return { sink, lines };
}

/** A chunk as the stream has it: 8-byte record headers, pages, and 9-byte zero records between them. */
function chunkOf(layout: string): { chunk: Uint8Array; pages: Uint8Array[] } {
  const chunk = new Uint8Array(16 + layout.length * (8 + PAGE_BYTES));
  const pages: Uint8Array[] = [];
  let at = 16;
  for (const [n, kind] of [...layout].entries()) {
    if (kind === "z") {
      at += 9;
      continue;
    }
    at += 8;
    const page = chunk.subarray(at, at + PAGE_BYTES);
    for (let i = 0; i < PAGE_BYTES; i++) page[i] = (n * 131 + i * 7) & 0xff;
    pages.push(page);
    at += PAGE_BYTES;
  }
  // the reader's chunk is a view into a larger buffer
  return { chunk: chunk.subarray(4), pages };
}

describe("PageRun", () => {
  test("pages and zero pages come out in order, each page with its own digest, after one settle", () => {
    const { chunk, pages } = chunkOf("ppzpzzppppppppppppppppppzp");
    const { sink, lines } = recorder();
    const run = new PageRun();
    run.begin(chunk);
    const expected: string[] = [];
    let p = 0;
    for (const [n, kind] of [..."ppzpzzppppppppppppppppppzp"].entries()) {
      if (kind === "z") {
        expect(run.addZero(0, n)).toBe(true);
        expected.push(`zero 0:${n}`);
      } else {
        const page = pages[p++]!;
        expect(run.addPage(1, n, page)).toBe(true);
        const sha = createHash("sha256").update(page).digest("hex");
        expected.push(`page 1:${n} ${sha} ${sha}`);
      }
    }
    expect(lines).toEqual([]);
    run.settle(sink);
    expect(lines).toEqual(expected);
    run.end();
  });

  test("a zero page with no run waiting is the caller's to apply at once", () => {
    const run = new PageRun();
    run.begin(chunkOf("p").chunk);
    expect(run.addZero(0, 0)).toBe(false);
    run.end();
  });

  test("pages outside the chunk, or with no chunk begun, do not wait", () => {
    const { chunk, pages } = chunkOf("pp");
    const run = new PageRun();
    expect(run.addPage(0, 0, pages[0]!)).toBe(false);
    run.begin(chunk.subarray(0, 100));
    // in the same buffer, but past the chunk the reader was given
    expect(run.addPage(0, 0, pages[0]!)).toBe(false);
    run.end();
    run.begin(chunk);
    // a page the reader carried over lies in its own buffer
    expect(run.addPage(0, 0, new Uint8Array(PAGE_BYTES).fill(3))).toBe(false);
    expect(run.addPage(0, 1, pages[1]!)).toBe(true);
    expect(() => run.end()).toThrow("unsettled");
    run.settle(recorder().sink);
    run.end();
  });

  test("a full run says so, and takes pages again once settled", () => {
    const layout = "p".repeat(130);
    const { chunk, pages } = chunkOf(layout);
    const { sink, lines } = recorder();
    const run = new PageRun();
    run.begin(chunk);
    let n = 0;
    while (run.addPage(0, n, pages[n]!)) n++;
    expect(n).toBe(128);
    run.settle(sink);
    expect(run.addPage(0, n, pages[n]!)).toBe(true);
    run.settle(sink);
    run.end();
    expect(lines.length).toBe(129);
    for (const line of lines) {
      const [, , digest, sha] = line.split(" ");
      expect(digest).toBe(sha);
    }
  });
});
