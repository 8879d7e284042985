// Page digests, the digest index and the page store, each checked against a
// plain reference: blake3-wasm (BLAKE3 of its own, in WebAssembly) for
// digests, Maps for the index and the store.

import { describe, expect, test } from "bun:test";
import { hash as blake3 } from "blake3-wasm";
import { readFileSync } from "node:fs";
import { DIGEST_BYTES, PAGE_BYTES, batchDigestNative, digestHex, digestPage, digestPages, digestPagesAt, isZeroPage } from "../core/dedup/digest.ts";
import { digestLanes } from "../core/dedup/native-digest.ts";
import { DigestIndex } from "../core/dedup/digest-index.ts";
import { PageStore } from "../core/dedup/page-store.ts";
import { type ErrorKind, SgmError } from "../core/errors.ts";

// Seeded so a failure replays (mulberry32).
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function randomBytes(n: number, next: () => number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (next() * 256) | 0;
  return out;
}

const flags = new Set(/^flags\s*:(.*)$/m.exec(readFileSync("/proc/cpuinfo", "utf8"))?.[1]?.trim().split(/\s+/) ?? []);

function blake3Hex(bytes: Uint8Array): string {
  return Buffer.from(blake3(bytes) as Uint8Array).toString("hex");
}

function expectSgmError(fn: () => unknown, kind: ErrorKind): void {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(SgmError);
    expect((err as SgmError).kind).toBe(kind);
    return;
  }
  throw new Error("expected an SgmError");
}

describe("digestPage", () => {
  test("matches blake3-wasm for pages at any byteOffset, written at any output offset", () => {
    const next = rng(1);
    const big = randomBytes(3 * PAGE_BYTES, next);
    for (const pageOffset of [0, 1, 3, 4, 7, 8, 13, 4093, PAGE_BYTES, 2 * PAGE_BYTES - 5]) {
      const page = big.subarray(pageOffset, pageOffset + PAGE_BYTES);
      for (const outOffset of [0, 1, 5, 32, 67]) {
        const out = new Uint8Array(outOffset + DIGEST_BYTES + 9).fill(0xaa);
        digestPage(page, out, outOffset);
        expect(digestHex(out, outOffset)).toBe(blake3Hex(page));
        // Nothing written outside the 32 bytes.
        expect(out.subarray(0, outOffset).every((b) => b === 0xaa)).toBe(true);
        expect(out.subarray(outOffset + DIGEST_BYTES).every((b) => b === 0xaa)).toBe(true);
      }
    }
  });

  test("rejects an output too short for a digest", () => {
    const page = new Uint8Array(PAGE_BYTES);
    expectSgmError(() => digestPage(page, new Uint8Array(31)), "internal");
    expectSgmError(() => digestPage(page, new Uint8Array(40), 9), "internal");
    expectSgmError(() => digestPage(page, new Uint8Array(40), -1), "internal");
  });

  test("digestHex reads 32 bytes at an offset", () => {
    const d = new Uint8Array(40);
    for (let i = 0; i < 40; i++) d[i] = i;
    expect(digestHex(d, 8)).toBe(Buffer.from(d.subarray(8, 40)).toString("hex"));
    expectSgmError(() => digestHex(d, 9), "internal");
  });
});

describe("digestPages", () => {
  test("sixteen pages side by side wherever the CPU has AVX-512 (F and BW), eight with AVX2, unless SGM_NATIVE_DIGEST says fewer", () => {
    const env = process.env.SGM_NATIVE_DIGEST;
    const widest = flags.has("avx512f") && flags.has("avx512bw") ? 16 : flags.has("avx2") ? 8 : 1;
    expect(digestLanes).toBe(env === "0" ? 1 : env === "8" ? Math.min(widest, 8) : widest);
    expect(batchDigestNative).toBe(digestLanes > 1);
  });

  test("matches blake3-wasm for 1 to 40 pages and 128, at strides and offsets that are not the page's, writing nothing else", () => {
    const next = rng(7);
    for (const count of [1, 2, 3, 15, 16, 17, 31, 32, 33, 40, 128]) {
      for (const [stride, offset] of [[PAGE_BYTES, 0], [PAGE_BYTES + 32, 36], [PAGE_BYTES + 1, 3]] as const) {
        const bytes = randomBytes(offset + (count - 1) * stride + PAGE_BYTES + 5, next);
        // pages that differ in one byte, and a zero page, among the random ones
        if (count > 2) {
          bytes.copyWithin(offset + stride, offset, offset + PAGE_BYTES);
          bytes[offset + stride + 4095] = bytes[offset + 4095]! ^ 1;
          bytes.fill(0, offset + 2 * stride, offset + 2 * stride + PAGE_BYTES);
        }
        const pages = bytes.subarray(offset);
        const out = new Uint8Array(count * DIGEST_BYTES + 7).fill(0xaa);
        digestPages(pages, stride, count, out);
        for (let n = 0; n < count; n++) {
          expect(digestHex(out, n * DIGEST_BYTES)).toBe(blake3Hex(pages.subarray(n * stride, n * stride + PAGE_BYTES)));
        }
        expect(out.subarray(count * DIGEST_BYTES).every((b) => b === 0xaa)).toBe(true);
      }
    }
  });

  test.each([
    ["0", "the kernel any x86-64 runs, a page at a time", 1],
    ["8", "AVX2's, eight pages at a time where the CPU has it", flags.has("avx2") ? 8 : 1],
  ])("with SGM_NATIVE_DIGEST=%s, %s, the digests are the same", (env, _how, lanes) => {
    const script = `
      import { digestLanes } from ${JSON.stringify(`${import.meta.dir}/../core/dedup/native-digest.ts`)};
      import { digestPage, digestPages } from ${JSON.stringify(`${import.meta.dir}/../core/dedup/digest.ts`)};
      const pages = new Uint8Array(20 * 4100);
      for (let i = 0; i < pages.length; i++) pages[i] = (i * 7919) >>> 3;
      const out = new Uint8Array(20 * 32);
      digestPages(pages, 4100, 20, out);
      const one = new Uint8Array(32 + 5);
      digestPage(pages.subarray(3, 3 + 4096), one, 5);
      console.log(JSON.stringify({ digestLanes, out: Buffer.from(out).toString("hex"), one: Buffer.from(one.subarray(5)).toString("hex") }));`;
    const run = Bun.spawnSync([process.execPath, "-e", script], { env: { ...process.env, SGM_NATIVE_DIGEST: env } });
    expect(run.stderr.toString()).toBe("");
    const got = JSON.parse(run.stdout.toString());
    expect(got.digestLanes).toBe(lanes);
    const { out, one } = got;
    const pages = new Uint8Array(20 * 4100);
    for (let i = 0; i < pages.length; i++) pages[i] = (i * 7919) >>> 3;
    const want = Array.from({ length: 20 }, (_, n) => blake3Hex(pages.subarray(n * 4100, n * 4100 + PAGE_BYTES))).join("");
    expect(out).toBe(want);
    expect(one).toBe(blake3Hex(pages.subarray(3, 3 + PAGE_BYTES)));
  });

  test("a page of another length is an internal error, not a digest", () => {
    expectSgmError(() => digestPage(new Uint8Array(PAGE_BYTES - 1), new Uint8Array(DIGEST_BYTES)), "internal");
    expectSgmError(() => digestPage(new Uint8Array(PAGE_BYTES + 1), new Uint8Array(DIGEST_BYTES)), "internal");
  });

  test("pages in shared memory, as digest threads hash them", () => {
    const pages = new Uint8Array(new SharedArrayBuffer(20 * PAGE_BYTES));
    pages.set(randomBytes(pages.length, rng(9)));
    const out = new Uint8Array(new SharedArrayBuffer(20 * DIGEST_BYTES));
    digestPages(pages, PAGE_BYTES, 20, out);
    for (let n = 0; n < 20; n++) expect(digestHex(out, n * DIGEST_BYTES)).toBe(blake3Hex(pages.subarray(n * PAGE_BYTES, (n + 1) * PAGE_BYTES)));
  });

  test.each([
    ["as many pages side by side as the CPU can", {}],
    ["eight at a time at most (SGM_NATIVE_DIGEST=8)", { SGM_NATIVE_DIGEST: "8" }],
    ["a page at a time (SGM_NATIVE_DIGEST=0)", { SGM_NATIVE_DIGEST: "0" }],
  ])("split between hash helper threads and the caller, call after call, the digests are the same: %s", (_how, env) => {
    // a child of its own: helpers run for the life of their process
    const script = `
      import { hash } from "blake3-wasm";
      import { digestPagesAt } from ${JSON.stringify(`${import.meta.dir}/../core/dedup/digest.ts`)};
      import { pagesHashedByHelpers, startHashHelpers } from ${JSON.stringify(`${import.meta.dir}/../core/dedup/native-digest.ts`)};
      const helpers = startHashHelpers(2);
      let seed = 11, wrong = 0, calls = 0;
      const next = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 4294967296);
      // two buffers and two outputs by turns, rewritten between calls: a helper late from one call must not hash the next with its addresses
      const buffers = [new Uint8Array(260 * 4096 + 64), new Uint8Array(260 * 4096 + 64)];
      const outputs = [new Uint8Array(256 * 32), new Uint8Array(256 * 32)];
      for (; calls < 1500; calls++) {
        const bytes = buffers[calls % 2], out = outputs[calls % 2];
        const count = 1 + Math.floor(next() * (next() < 0.5 ? 40 : 256));
        const shift = Math.floor(next() * 64);
        for (let i = 0; i < bytes.length; i += 64) bytes[i] = Math.floor(next() * 256);
        const offsets = Uint32Array.from({ length: count }, () => shift + Math.floor(next() * 256) * 4096);
        digestPagesAt(bytes, offsets, count, out);
        // what the call left as it returned: a group still being hashed then is wrong here
        const got = out.slice(0, count * 32);
        for (let n = 0; n < count; n++) {
          const want = hash(bytes.subarray(offsets[n], offsets[n] + 4096));
          if (!want.every((b, k) => got[n * 32 + k] === b)) wrong++;
        }
      }
      console.log(JSON.stringify({ helpers, wrong, calls, helperPages: pagesHashedByHelpers() }));`;
    // bounded: a helper that never let its caller go would hang here
    const run = Bun.spawnSync([process.execPath, "-e", script], { env: { ...process.env, ...env }, timeout: 50_000 });
    expect(run.stderr.toString()).toBe("");
    expect(run.exitCode, "the child did not end by itself within 50 s").toBe(0);
    const got = JSON.parse(run.stdout.toString());
    expect(got.wrong).toBe(0);
    expect(got.calls).toBe(1500);
    expect(got.helpers).toBe(2);
    // they took part: over 1500 calls the kernel runs them at some point, however busy the machine
    expect(got.helperPages).toBeGreaterThan(0);
  }, 60_000);

  test("never reads or writes past its views: a range that does not fit is an internal error", () => {
    const pages = new Uint8Array(4 * PAGE_BYTES);
    digestPages(pages, PAGE_BYTES, 0, new Uint8Array(0));
    expectSgmError(() => digestPages(pages, PAGE_BYTES, 5, new Uint8Array(5 * DIGEST_BYTES)), "internal");
    expectSgmError(() => digestPages(pages.subarray(1), PAGE_BYTES, 4, new Uint8Array(4 * DIGEST_BYTES)), "internal");
    expectSgmError(() => digestPages(pages, PAGE_BYTES, 4, new Uint8Array(4 * DIGEST_BYTES - 1)), "internal");
    expectSgmError(() => digestPages(pages, PAGE_BYTES - 1, 2, new Uint8Array(2 * DIGEST_BYTES)), "internal");
    expectSgmError(() => digestPages(pages, PAGE_BYTES, -1, new Uint8Array(0)), "internal");
    // a stride past what 32-bit offsets hold must not wrap round to page 0
    expectSgmError(() => digestPages(pages, 2 ** 32, 2, new Uint8Array(2 * DIGEST_BYTES)), "internal");
    expectSgmError(() => digestPagesAt(pages, Uint32Array.of(0, 3 * PAGE_BYTES + 1), 2, new Uint8Array(2 * DIGEST_BYTES)), "internal");
  });
});

describe("isZeroPage", () => {
  test("zero and non-zero pages at aligned and unaligned offsets", () => {
    const big = new Uint8Array(3 * PAGE_BYTES);
    for (const offset of [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 4095, PAGE_BYTES]) {
      const page = big.subarray(offset, offset + PAGE_BYTES);
      expect(isZeroPage(page)).toBe(true);
      for (const at of [0, 1, 7, 8, 2048, PAGE_BYTES - 8, PAGE_BYTES - 1]) {
        for (const value of [1, 0x80, 0xff]) {
          page[at] = value;
          expect(isZeroPage(page)).toBe(false);
          page[at] = 0;
        }
      }
      // Bytes just outside the view must not count.
      if (offset > 0) big[offset - 1] = 1;
      big[offset + PAGE_BYTES] = 1;
      expect(isZeroPage(page)).toBe(true);
      big.fill(0);
    }
  });

  test("a page whose words read as -0.0 is not zero", () => {
    const page = new Uint8Array(PAGE_BYTES);
    page[PAGE_BYTES - 1] = 0x80; // the sign bit of the last little-endian float64
    expect(isZeroPage(page)).toBe(false);
  });

  test("other lengths", () => {
    expect(isZeroPage(new Uint8Array(0))).toBe(true);
    expect(isZeroPage(new Uint8Array(5))).toBe(true);
    for (const length of [1, 100, PAGE_BYTES + 1, 2 * PAGE_BYTES, 3 * PAGE_BYTES - 7]) {
      const bytes = new Uint8Array(length + 3).subarray(3);
      expect(isZeroPage(bytes)).toBe(true);
      bytes[length - 1] = 1;
      expect(isZeroPage(bytes)).toBe(false);
    }
  });
});

/**
 * Runs `ops` random operations on a DigestIndex and a Map model side by side.
 * `makeDigest` draws digests from a pool of `poolSize`, so inserts and lookups
 * hit both held and absent digests.
 */
function runIndexModel(seed: number, ops: number, poolSize: number, makeDigest: (next: () => number) => Uint8Array): void {
  const next = rng(seed);
  const pool: Uint8Array[] = [];
  for (let i = 0; i < poolSize; i++) pool.push(makeDigest(next));
  const poolHex = pool.map((d) => digestHex(d));
  expect(new Set(poolHex).size).toBe(poolSize);

  const index = new DigestIndex();
  const idOfHex = new Map<string, number>();
  const hexOfId = new Map<number, string>();
  const freed: number[] = [];
  let nextId = 0;
  let removals = 0;
  let reuses = 0;
  // Digests are also presented inside a larger buffer at an odd offset.
  const carrier = new Uint8Array(DIGEST_BYTES + 11);

  const checkAll = (): void => {
    expect(index.size).toBe(idOfHex.size);
    for (let p = 0; p < poolSize; p++) {
      const expected = idOfHex.get(poolHex[p]!) ?? -1;
      expect(index.lookup(pool[p]!)).toBe(expected);
    }
    for (const [id, hex] of hexOfId) {
      expect(index.has(id)).toBe(true);
      expect(digestHex(index.digestOf(id))).toBe(hex);
    }
  };

  for (let op = 0; op < ops; op++) {
    const r = next();
    const p = (next() * poolSize) | 0;
    const digest = pool[p]!;
    const hex = poolHex[p]!;
    if (r < 0.5) {
      const expected = idOfHex.get(hex);
      let id: number;
      if (next() < 0.5) {
        id = index.insert(digest);
      } else {
        carrier.set(digest, 7);
        id = index.insert(carrier, 7);
      }
      if (expected !== undefined) {
        expect(id).toBe(expected);
      } else {
        // Documented: the most recently removed id first, else the next unused.
        const reusing = freed.length > 0;
        const want = reusing ? freed.pop()! : nextId++;
        if (reusing) reuses++;
        expect(id).toBe(want);
        idOfHex.set(hex, id);
        hexOfId.set(id, hex);
      }
    } else if (r < 0.75) {
      expect(index.lookup(digest)).toBe(idOfHex.get(hex) ?? -1);
    } else if (idOfHex.size > 0) {
      // Remove a held digest: the one at p if held, else the next held one in the pool.
      let q = p;
      while (!idOfHex.has(poolHex[q]!)) q = (q + 1) % poolSize;
      const id = idOfHex.get(poolHex[q]!)!;
      index.remove(id);
      idOfHex.delete(poolHex[q]!);
      hexOfId.delete(id);
      freed.push(id);
      removals++;
      expect(index.has(id)).toBe(false);
      expect(index.lookup(pool[q]!)).toBe(-1);
    }
    if (op % 25_000 === 0) checkAll();
  }
  checkAll();
  expect(removals).toBeGreaterThan(ops / 10);
  expect(reuses).toBeGreaterThan(0);
}

describe("DigestIndex", () => {
  test("200k random inserts, lookups and removals agree with a Map", () => {
    runIndexModel(2, 200_000, 60_000, (next) => randomBytes(DIGEST_BYTES, next));
  });

  test("crowded probe runs: digests whose first 8 bytes share few values", () => {
    // Only 64 distinct hashes, all near each other: long runs that wrap past
    // the end of the table, which is what backward-shift deletion must get right.
    runIndexModel(3, 30_000, 600, (next) => {
      const d = randomBytes(DIGEST_BYTES, next);
      d.fill(0, 0, 8);
      d[0] = 0xc0 | ((next() * 64) | 0);
      d[1] = 0x03; // the last 64 slots of a 1024-slot table, the size it settles at
      return d;
    });
  });

  test("grows from empty to a million entries", () => {
    const index = new DigestIndex();
    const digests = new Uint8Array(1_000_000 * DIGEST_BYTES);
    crypto.getRandomValues(digests.subarray(0, 65536));
    for (let o = 65536; o < digests.length; o += 65536) crypto.getRandomValues(digests.subarray(o, o + 65536));
    for (let i = 0; i < 1_000_000; i++) expect(index.insert(digests, i * DIGEST_BYTES)).toBe(i);
    expect(index.size).toBe(1_000_000);
    for (let i = 0; i < 1_000_000; i += 997) expect(index.lookup(digests, i * DIGEST_BYTES)).toBe(i);
    expect(index.digestOf(123_456)).toEqual(digests.subarray(123_456 * DIGEST_BYTES, 123_457 * DIGEST_BYTES));
  });

  test("misuse is an internal error", () => {
    const index = new DigestIndex();
    const d = new Uint8Array(DIGEST_BYTES);
    const id = index.insert(d);
    expectSgmError(() => index.lookup(new Uint8Array(31)), "internal");
    expectSgmError(() => index.insert(d, 1), "internal");
    expectSgmError(() => index.remove(id + 1), "internal");
    expectSgmError(() => index.digestOf(-1), "internal");
    index.remove(id);
    expectSgmError(() => index.remove(id), "internal");
    expectSgmError(() => index.digestOf(id), "internal");
  });
});

function pageOf(seed: number): { page: Uint8Array; digest: Uint8Array } {
  const page = randomBytes(PAGE_BYTES, rng(seed));
  const digest = new Uint8Array(DIGEST_BYTES);
  digestPage(page, digest);
  return { page, digest };
}

describe("PageStore", () => {
  test("put, get, refcounts and release", () => {
    const store = new PageStore();
    expect(store.capacityBytes).toBe(Infinity);
    const a = pageOf(10);
    const b = pageOf(11);

    const putA = store.put(a.digest, 0, a.page)!;
    expect(putA).toEqual({ id: putA.id, added: true });
    expect(store.refCount(putA.id)).toBe(1);
    expect(store.get(putA.id)).toEqual(a.page);
    // The store holds a copy.
    a.page[0]! ^= 0xff;
    expect(store.get(putA.id)[0]).toBe(a.page[0]! ^ 0xff);
    a.page[0]! ^= 0xff;

    // A second put of the same digest only counts a reference; its bytes are not read.
    const again = store.put(a.digest, 0, b.page)!;
    expect(again).toEqual({ id: putA.id, added: false });
    expect(store.refCount(putA.id)).toBe(2);
    expect(store.get(putA.id)).toEqual(a.page);

    // A digest inside a larger buffer.
    const carrier = new Uint8Array(100);
    carrier.set(b.digest, 50);
    const putB = store.put(carrier, 50, b.page)!;
    expect(putB.added).toBe(true);
    expect(putB.id).not.toBe(putA.id);
    expect(store.pages).toBe(2);
    expect(store.usedBytes).toBe(2 * PAGE_BYTES);
    expect(store.has(carrier, 50)).toBe(true);
    expect(store.getByDigest(b.digest)).toEqual(b.page);
    expect(store.idOf(b.digest)).toBe(putB.id);
    expect(digestHex(store.digestOf(putB.id))).toBe(digestHex(b.digest));

    store.retain(putA.id);
    expect(store.refCount(putA.id)).toBe(3);
    expect(store.release(putA.id)).toBe(2);
    expect(store.release(putA.id)).toBe(1);
    expect(store.has(a.digest, 0)).toBe(true);
    expect(store.release(putA.id)).toBe(0);
    expect(store.has(a.digest, 0)).toBe(false);
    expect(store.getByDigest(a.digest)).toBeUndefined();
    expect(store.idOf(a.digest)).toBe(-1);
    expect(store.refCount(putA.id)).toBe(0);
    expect(store.pages).toBe(1);
    expect(store.usedBytes).toBe(PAGE_BYTES);
    expectSgmError(() => store.get(putA.id), "internal");
    expectSgmError(() => store.release(putA.id), "internal");
    expectSgmError(() => store.retain(putA.id), "internal");

    // The freed slot is reused, and holds the new page's bytes.
    const c = pageOf(12);
    const putC = store.put(c.digest, 0, c.page)!;
    expect(putC).toEqual({ id: putA.id, added: true });
    expect(store.get(putC.id)).toEqual(c.page);
    expect(store.getByDigest(b.digest)).toEqual(b.page);
  });

  test("a page put from inside a larger buffer, and copied out into one", () => {
    const store = new PageStore();
    const a = pageOf(30);
    const carrier = new Uint8Array(3 * PAGE_BYTES + 7);
    carrier.set(a.page, PAGE_BYTES + 7);
    const put = store.put(a.digest, 0, carrier, PAGE_BYTES + 7)!;
    expect(put.added).toBe(true);
    carrier.fill(0); // the store holds a copy
    expect(store.get(put.id)).toEqual(a.page);
    const out = new Uint8Array(2 * PAGE_BYTES).fill(0xee);
    store.copyOut(put.id, out, 3);
    expect(blake3Hex(out.subarray(3, 3 + PAGE_BYTES))).toBe(digestHex(a.digest));
    expect(out[2]).toBe(0xee);
    expect(out[3 + PAGE_BYTES]).toBe(0xee);
    // no page fits at these offsets: nothing is stored, nothing written past the buffer
    expectSgmError(() => store.put(pageOf(31).digest, 0, carrier, 2 * PAGE_BYTES + 8), "internal");
    expectSgmError(() => store.put(pageOf(31).digest, 0, carrier, -1), "internal");
    expectSgmError(() => store.copyOut(put.id, out, PAGE_BYTES + 1), "internal");
    expect(store.pages).toBe(1);
  });

  test("capacity: a new page past it is refused with null, a known one is not", () => {
    const store = new PageStore({ capacityBytes: 3 * PAGE_BYTES + 100 });
    expect(store.capacityBytes).toBe(3 * PAGE_BYTES + 100);
    const pages = [pageOf(20), pageOf(21), pageOf(22), pageOf(23)];
    const ids = pages.slice(0, 3).map((p) => store.put(p.digest, 0, p.page)!.id);
    expect(store.usedBytes).toBe(3 * PAGE_BYTES);

    expect(store.put(pages[3]!.digest, 0, pages[3]!.page)).toBeNull();
    expect(store.has(pages[3]!.digest, 0)).toBe(false);
    expect(store.pages).toBe(3);

    expect(store.put(pages[1]!.digest, 0, pages[1]!.page)).toEqual({ id: ids[1]!, added: false });
    expect(store.refCount(ids[1]!)).toBe(2);

    expect(store.release(ids[0]!)).toBe(0);
    const put3 = store.put(pages[3]!.digest, 0, pages[3]!.page)!;
    expect(put3.added).toBe(true);
    expect(store.get(put3.id)).toEqual(pages[3]!.page);

    const none = new PageStore({ capacityBytes: 0 });
    expect(none.put(pages[0]!.digest, 0, pages[0]!.page)).toBeNull();
  });

  test("preallocate: the slabs the capacity needs, a few at a time or all, none beyond as it fills, and the pages in them intact", () => {
    // 2.5 slabs of 1024 pages: three slabs, the last one part used
    const store = new PageStore({ capacityBytes: 2560 * PAGE_BYTES });
    expect(store.slabBytes).toBe(0);
    expect(store.preallocate(1)).toBe(2);
    expect(store.slabBytes).toBe(1024 * PAGE_BYTES);
    expect(store.preallocate()).toBe(0);
    expect(store.slabBytes).toBe(3 * 1024 * PAGE_BYTES);
    const pages = Array.from({ length: 2560 }, (_, i) => pageOf(100_000 + i));
    const ids = pages.map((p) => store.put(p.digest, 0, p.page)!.id);
    expect(store.put(pageOf(99).digest, 0, pageOf(99).page)).toBeNull();
    expect(store.slabBytes).toBe(3 * 1024 * PAGE_BYTES);
    ids.forEach((id, i) => expect(store.get(id)).toEqual(pages[i]!.page));
    expectSgmError(() => new PageStore().preallocate(), "internal");
  });

  test("bad arguments are internal errors", () => {
    expectSgmError(() => new PageStore({ capacityBytes: -1 }), "internal");
    expectSgmError(() => new PageStore({ capacityBytes: Number.NaN }), "internal");
    expectSgmError(() => new PageStore({ slabPages: 1000 }), "internal");
    const store = new PageStore();
    const a = pageOf(30);
    expectSgmError(() => store.put(a.digest, 0, a.page.subarray(1)), "internal");
    expectSgmError(() => store.put(a.digest, 1, a.page), "internal");
  });

  test("content stays intact through many random puts and releases across slabs", () => {
    const next = rng(40);
    const poolSize = 700;
    // Pages cut from one buffer at odd offsets, so puts copy from unaligned views.
    const backing = randomBytes(poolSize * PAGE_BYTES + 3, next);
    const pool = Array.from({ length: poolSize }, (_, i) => {
      const page = backing.subarray(3 + i * PAGE_BYTES, 3 + (i + 1) * PAGE_BYTES);
      const digest = new Uint8Array(DIGEST_BYTES);
      digestPage(page, digest);
      return { page, digest, hex: blake3Hex(page) };
    });

    const capacityPages = 300;
    const store = new PageStore({ capacityBytes: capacityPages * PAGE_BYTES, slabPages: 8 });
    const refs = new Map<number, number>(); // pool index -> references held
    const idOf = new Map<number, number>(); // pool index -> id
    let refused = 0;
    let maxId = -1;

    const checkAll = (): void => {
      expect(store.pages).toBe(refs.size);
      expect(store.usedBytes).toBe(refs.size * PAGE_BYTES);
      for (const [p, count] of refs) {
        const id = idOf.get(p)!;
        expect(store.refCount(id)).toBe(count);
        const held = store.get(id);
        expect(blake3Hex(held)).toBe(pool[p]!.hex);
        expect(Buffer.from(held).equals(pool[p]!.page)).toBe(true);
      }
    };

    for (let op = 0; op < 30_000; op++) {
      const p = (next() * poolSize) | 0;
      const entry = pool[p]!;
      const held = refs.get(p);
      if (next() < 0.55) {
        const result = store.put(entry.digest, 0, entry.page);
        if (held !== undefined) {
          expect(result).toEqual({ id: idOf.get(p)!, added: false });
          refs.set(p, held + 1);
        } else if (refs.size >= capacityPages) {
          expect(result).toBeNull();
          refused++;
        } else {
          expect(result!.added).toBe(true);
          refs.set(p, 1);
          idOf.set(p, result!.id);
          maxId = Math.max(maxId, result!.id);
        }
      } else if (held !== undefined) {
        const remaining = store.release(idOf.get(p)!);
        expect(remaining).toBe(held - 1);
        if (remaining === 0) {
          refs.delete(p);
          idOf.delete(p);
          expect(store.has(entry.digest, 0)).toBe(false);
        } else {
          refs.set(p, remaining);
        }
      }
      if (op % 3000 === 0) checkAll();
    }
    checkAll();
    expect(refused).toBeGreaterThan(0);
    // Ids, and so slots, never outrun the number of pages the store may hold.
    expect(maxId).toBeLessThan(capacityPages);
  });

  test("kept pages: spare when no reference is left, a slot for a new page when full, gone with their last keeper; content intact throughout", () => {
    const next = rng(41);
    const poolSize = 260;
    const pool = Array.from({ length: poolSize }, () => {
      const page = randomBytes(PAGE_BYTES, next);
      const digest = new Uint8Array(DIGEST_BYTES);
      digestPage(page, digest);
      return { page, digest };
    });
    const capacityPages = 200;
    const store = new PageStore({ capacityBytes: capacityPages * PAGE_BYTES, slabPages: 8 });
    // the model: pool index -> references and keepers; a page is in the store while either is above 0
    const model = new Map<number, { id: number; refs: number; keeps: number }>();
    const counts = { evicted: 0, spareSeen: 0, revived: 0 };
    const checkAll = (): void => {
      let spare = 0;
      for (const [p, m] of model) {
        expect(store.idOf(pool[p]!.digest, 0)).toBe(m.id);
        expect(store.refCount(m.id)).toBe(m.refs);
        expect(Buffer.from(store.get(m.id)).equals(pool[p]!.page)).toBe(true);
        if (m.refs === 0) spare++;
      }
      expect(store.pages).toBe(model.size);
      expect(store.spareBytes).toBe(spare * PAGE_BYTES);
      expect(store.full).toBe(model.size >= capacityPages);
    };
    const drop = (p: number) => {
      model.delete(p);
      expect(store.has(pool[p]!.digest, 0)).toBe(false);
    };
    for (let op = 0; op < 40_000; op++) {
      const p = (next() * poolSize) | 0;
      const m = model.get(p);
      const roll = next();
      if (roll < 0.4) {
        if (!m && store.full && next() < 0.2) {
          // what a relay does for a new page when full: a spare page gives up its slot
          const id = store.evictSpare();
          const victim = [...model].find(([, v]) => v.id === id);
          if (victim) {
            expect(victim[1].refs).toBe(0);
            drop(victim[0]);
            counts.evicted++;
          } else {
            expect(id).toBe(-1);
            expect([...model.values()].every((v) => v.refs > 0)).toBe(true);
          }
        }
        const result = store.put(pool[p]!.digest, 0, pool[p]!.page);
        if (m) {
          expect(result).toEqual({ id: m.id, added: false });
          if (m.refs === 0) counts.revived++;
          m.refs++;
        } else if (model.size >= capacityPages) {
          expect(result).toBeNull();
        } else {
          expect(result!.added).toBe(true);
          model.set(p, { id: result!.id, refs: 1, keeps: 0 });
        }
      } else if (roll < 0.7) {
        if (m && m.refs > 0) {
          expect(store.release(m.id)).toBe(--m.refs);
          if (m.refs === 0 && m.keeps === 0) drop(p);
          if (m.refs === 0 && m.keeps > 0) counts.spareSeen++;
        }
      } else if (roll < 0.85) {
        if (m) {
          store.keep(m.id);
          m.keeps++;
        }
      } else if (m && m.keeps > 0) {
        store.unkeep(m.id);
        m.keeps--;
        if (m.refs === 0 && m.keeps === 0) drop(p);
      }
      if (op % 1000 === 0) checkAll();
    }
    checkAll();
    // every path was taken
    expect(counts.evicted).toBeGreaterThan(0);
    expect(counts.spareSeen).toBeGreaterThan(0);
    expect(counts.revived).toBeGreaterThan(0);
    const spareId = [...model.values()].find((v) => v.refs === 0 && v.keeps > 0)?.id;
    if (spareId !== undefined) expectSgmError(() => store.release(spareId), "internal");
    const unkept = [...model.values()].find((v) => v.keeps === 0)?.id;
    if (unkept !== undefined) expectSgmError(() => store.unkeep(unkept), "internal");
  });
});
