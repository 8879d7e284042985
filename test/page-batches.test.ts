// Digest threads: pages hashed on real worker threads reach the pipeline
// in exactly the order the source sent them, mixed with zero pages,
// discards, flushes and urgent pages, each with its own digest (checked
// against blake3-wasm), however the records fall across batches and turns
// of the event loop.

import { afterAll, describe, expect, test } from "bun:test";
import { hash as blake3 } from "blake3-wasm";
import { DIGEST_BYTES, PAGE_BYTES } from "../core/dedup/digest.ts";
import { BATCH_PAGES, DigestPool, defaultDigestThreads } from "../core/dedup/digest-pool.ts";
import type { SgmError } from "../core/errors.ts";
import { MAX_OUTSTANDING, PageBatches, type RecordSink } from "../core/scatter/page-batches.ts";

const pool = new DigestPool(2);
afterAll(() => pool.close());

function hex(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString("hex");
}

/** A sink that writes down each record as a line, with the digest it was given. */
function recorder(): { sink: RecordSink; lines: string[] } {
  const lines: string[] = [];
  const digestAt = (d: Uint8Array, at: number) => hex(d.subarray(at, at + DIGEST_BYTES));
  const sink: RecordSink = {
    page: (block, page, d, at, content) => lines.push(`page ${block}:${page} ${digestAt(d, at)} ${hex(blake3(content) as Uint8Array)}`),
    zero: (block, page) => lines.push(`zero ${block}:${page}`),
    pending: (block, page) => lines.push(`pending ${block}:${page}`),
    urgent: (block, page, d, at, content) =>
      lines.push(d && content ? `urgent ${block}:${page} ${digestAt(d, at)} ${hex(blake3(content) as Uint8Array)}` : `urgent ${block}:${page} zero`),
    flush: () => lines.push("flush"),
  };
  return { sink, lines };
}

function pageOf(seed: number): Uint8Array {
  const page = new Uint8Array(PAGE_BYTES);
  const view = new DataView(page.buffer);
  for (let i = 0; i < PAGE_BYTES; i += 4) view.setUint32(i, Math.imul(seed + 1, 2654435761) ^ i);
  return page;
}

describe("digest threads", () => {
  test("records come out in the order they went in, each page with its own digest", async () => {
    const { sink, lines } = recorder();
    const errors: SgmError[] = [];
    const batches = new PageBatches(pool, sink, (err) => errors.push(err));
    const expected: string[] = [];
    const zero = new Uint8Array(PAGE_BYTES);
    // several thousand records in uneven turns, so that batches fill, are
    // cut short by the end of a turn, and queue behind one another
    for (let turn = 0, n = 0; turn < 40; turn++) {
      const records = turn % 3 === 0 ? 700 : 37 + turn;
      for (let r = 0; r < records; r++, n++) {
        const kind = n % 11 === 0 ? "zero" : n % 17 === 0 ? "pending" : n % 97 === 0 ? "flush" : n % 251 === 0 ? "urgent" : "page";
        const block = n % 3;
        const page = n;
        if (kind === "zero") {
          batches.page(block, page, n % 2 ? null : zero);
          expected.push(`zero ${block}:${page}`);
        } else if (kind === "pending") {
          batches.pending(block, page);
          expected.push(`pending ${block}:${page}`);
        } else if (kind === "flush") {
          batches.flush();
          expected.push("flush");
        } else {
          const content = pageOf(n);
          const digest = hex(blake3(content) as Uint8Array);
          if (kind === "urgent") batches.urgent(block, page, content);
          else batches.page(block, page, content);
          // the caller's buffer is its own again at once: the batch holds a copy
          content.fill(0xa5);
          expected.push(`${kind} ${block}:${page} ${digest} ${digest}`);
        }
      }
      if (turn % 5 === 4) await batches.whenIdle();
      else await new Promise((resolve) => setImmediate(resolve));
      if (batches.backlogged) await batches.whenRoom();
    }
    await batches.whenIdle();
    expect(errors).toEqual([]);
    expect(lines.length).toBe(expected.length);
    expect(lines).toEqual(expected);
  });

  test("with nothing waiting, records that need no digest are applied at once", async () => {
    const { sink, lines } = recorder();
    const batches = new PageBatches(pool, sink, () => {});
    batches.pending(0, 1);
    batches.page(0, 2, null);
    batches.flush();
    expect(lines).toEqual(["pending 0:1", "zero 0:2", "flush"]);
    batches.page(0, 3, pageOf(3));
    batches.pending(0, 4); // waits behind the page being hashed
    expect(lines.length).toBe(3);
    await batches.whenIdle();
    expect(lines.slice(3).map((l) => l.split(" ").slice(0, 2).join(" "))).toEqual(["page 0:3", "pending 0:4"]);
  });

  test("the source is held back once enough batches wait, and let go as they are applied", async () => {
    const { sink, lines } = recorder();
    const batches = new PageBatches(pool, sink, () => {});
    let n = 0;
    while (!batches.backlogged) batches.page(0, n, pageOf(n++));
    expect(n).toBe(MAX_OUTSTANDING * BATCH_PAGES);
    await batches.whenRoom();
    expect(batches.backlogged as boolean).toBe(false);
    await batches.whenIdle();
    expect(lines.length).toBe(n);
  });

  test("stopped, nothing more is applied", async () => {
    const { sink, lines } = recorder();
    const batches = new PageBatches(pool, sink, () => {});
    for (let n = 0; n < 300; n++) batches.page(0, n, pageOf(n));
    batches.stop();
    // the pool completes in order: once a later batch is applied, the stopped ones have come back too
    const later = recorder();
    const after = new PageBatches(pool, later.sink, () => {});
    after.page(0, 0, pageOf(0));
    await after.whenIdle();
    expect(later.lines.length).toBe(1);
    expect(lines).toEqual([]);
  });

  test("the default leaves two cores to the source's reader and its QEMUs", () => {
    expect([1, 2, 3, 4, 6, 64].map((cores) => defaultDigestThreads(cores))).toEqual([0, 0, 1, 2, 4, 4]);
  });
});
