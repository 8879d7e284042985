// The gather applies the scatter's frames in the order they came, every page
// checked against its digest first, on digest threads or on its own thread.

import { afterAll, describe, expect, test } from "bun:test";
import { DIGEST_BYTES, digestHex, digestPage, PAGE_BYTES } from "../core/dedup/digest.ts";
import { DigestPool } from "../core/dedup/digest-pool.ts";
import type { SgmError } from "../core/errors.ts";
import { CheckedFrames } from "../core/gather/checked-frames.ts";
import { encodeDigests, FrameType, PageDataBuilder } from "../core/wire/messages.ts";

const pool = new DigestPool(2);
afterAll(() => pool.close());

function page(n: number): Uint8Array {
  const p = new Uint8Array(PAGE_BYTES);
  new DataView(p.buffer).setUint32(0, n + 1);
  p[PAGE_BYTES - 1] = n & 0xff;
  return p;
}

/** A PAGE_DATA payload of pages first..first+count-1; `wrong`: that one's digest is another page's. */
function pageData(first: number, count: number, wrong = -1): Uint8Array {
  const b = new PageDataBuilder();
  const digest = new Uint8Array(DIGEST_BYTES);
  for (let n = first; n < first + count; n++) {
    digestPage(page(n === wrong ? n + 1000 : n), digest);
    b.add(page(n), digest, 0);
  }
  return b.take().payload;
}

function unpin(n: number): Uint8Array {
  const digest = new Uint8Array(DIGEST_BYTES);
  digestPage(page(n), digest);
  return encodeDigests([digest]);
}

function recorder(threads: DigestPool | null) {
  const events: string[] = [];
  const failures: SgmError[] = [];
  let pauses = 0;
  let resumes = 0;
  let blocked = false;
  let settle: { count: number; resolve: () => void } | null = null;
  const note = (event: string) => {
    events.push(event);
    if (settle && events.length >= settle.count) settle.resolve();
  };
  const frames = new CheckedFrames(threads, {
    apply: (type, payload) => {
      note(`apply ${type} ${Buffer.from(payload).toString("hex")}`);
      // a frame that makes the handler hold the rest back, as a VM's block list does
      if (type === FrameType.VM_BYTES) blocked = true;
    },
    receive: (digests, digestAt, pages, pageAt) => {
      // the page must be the one its digest names, and whole
      const bytes = pages.subarray(pageAt, pageAt + PAGE_BYTES);
      if (bytes.length !== PAGE_BYTES) note(`SHORT page at ${pageAt} of ${pages.length}`);
      const check = new Uint8Array(DIGEST_BYTES);
      digestPage(bytes, check);
      if (digestHex(check) !== digestHex(digests, digestAt)) note(`WRONG page ${digestHex(digests, digestAt).slice(0, 8)}`);
      note(`page ${new DataView(bytes.buffer, bytes.byteOffset).getUint32(0) - 1}`);
    },
    tookData: (bytes) => note(`data ${bytes}`),
    pause: () => pauses++,
    resume: () => resumes++,
    blocked: () => blocked,
    fail: (err) => failures.push(err),
  });
  /** Resolves once `count` events are in. */
  const reach = (count: number) =>
    new Promise<void>((resolve) => {
      settle = { count, resolve };
      if (events.length >= count) resolve();
    });
  const unblock = () => {
    blocked = false;
    frames.proceed();
  };
  return { frames, events, failures, counts: () => ({ pauses, resumes }), reach, unblock };
}

function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: Timer | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`within ${ms} ms: ${what}`)), ms)));
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** What the frames must come to, applied in order (taken before the connection reuses their bytes). */
function expected(frames: Array<[number, Uint8Array, number, number]>): string[] {
  return frames.flatMap(([type, payload, first, count]) =>
    type === FrameType.PAGE_DATA
      ? [...Array.from({ length: count }, (_, k) => `page ${first + k}`), `data ${payload.length}`]
      : [`apply ${type} ${Buffer.from(payload).toString("hex")}`],
  );
}

describe("CheckedFrames", () => {
  for (const threads of [pool, null]) {
    const on = threads ? "on digest threads" : "on its own thread";
    test(`frames apply in the order they came, ${on}, whatever the connection does with their bytes after`, async () => {
      const r = recorder(threads);
      const frames: Array<[number, Uint8Array, number, number]> = [];
      for (let f = 0; f < 40; f++) {
        frames.push([FrameType.PAGE_DATA, pageData(f * 64, f % 5 === 4 ? 1 : 64), f * 64, f % 5 === 4 ? 1 : 64]);
        if (f % 3 === 0) frames.push([FrameType.UNPIN, unpin(f), 0, 0]);
      }
      const want = expected(frames);
      for (const [type, payload] of frames) {
        r.frames.take(type, payload);
        payload.fill(0xee); // the connection reuses its buffer
      }
      await within(r.reach(want.length), 4_000, `every frame applied (${r.events.length} of ${want.length} events)`);
      expect(r.failures).toEqual([]);
      expect(r.events).toEqual(want);
      if (threads) {
        // 40 frames of pages, 16 at most waiting: reading stopped, and went on
        expect(r.counts().pauses).toBeGreaterThan(0);
        expect(r.counts().resumes).toBe(r.counts().pauses);
      } else expect(r.counts()).toEqual({ pauses: 0, resumes: 0 });
    });

    test(`a page unlike its digest fails the frames, ${on}, and nothing after it applies`, async () => {
      const r = recorder(threads);
      const frames: Array<[number, Uint8Array, number, number]> = [
        [FrameType.PAGE_DATA, pageData(0, 64), 0, 64],
        [FrameType.UNPIN, unpin(1), 0, 0],
      ];
      const good = expected(frames);
      for (const [type, payload] of frames) r.frames.take(type, payload);
      const bad = pageData(64, 64, 100);
      let thrown: unknown = null;
      try {
        r.frames.take(FrameType.PAGE_DATA, bad);
        r.frames.take(FrameType.UNPIN, unpin(2));
        r.frames.take(FrameType.PAGE_DATA, pageData(128, 64));
      } catch (err) {
        thrown = err;
      }
      // the threads answer for the bad frame (and drop what follows) before a batch submitted after it
      if (threads) await within(throughPool(), 4_000, "a later batch through the same threads");
      const failure = threads ? r.failures[0] : (thrown as SgmError);
      expect(failure?.kind).toBe("data");
      expect(failure?.message).toContain("does not match its digest");
      // a bad frame changes nothing, and nothing after it applies
      expect(r.events).toEqual(good);
    });
  }

  test("large frames waiting behind a check stop the reading by their bytes, not only by their number", async () => {
    const r = recorder(pool);
    const frames: Array<[number, Uint8Array, number, number]> = [[FrameType.PAGE_DATA, pageData(0, 64), 0, 64]];
    // three frames of 3 MiB (as large as a device state may come): 9 MiB copied while the check runs, in 4 frames
    for (let f = 0; f < 3; f++) frames.push([FrameType.UNPIN, new Uint8Array(3 << 20).fill(f + 1), 0, 0]);
    for (const [type, payload] of frames) r.frames.take(type, payload);
    expect(r.counts().pauses).toBe(1);
    await within(r.reach(expected(frames).length), 4_000, "the frames applied");
    expect(r.counts()).toEqual({ pauses: 1, resumes: 1 });
  });

  test("frames still waiting when the connection fails are never applied", async () => {
    const r = recorder(pool);
    for (let f = 0; f < 8; f++) r.frames.take(FrameType.PAGE_DATA, pageData(f * 64, 64));
    r.frames.take(FrameType.UNPIN, unpin(0));
    r.frames.drop();
    // the threads still answer for the batches in flight: nothing of theirs may apply
    await within(throughPool(), 4_000, "a later batch through the same threads");
    expect(r.events).toEqual([]);
    expect(r.failures).toEqual([]);
  });

  test("nothing applies while the handler holds frames back; their pages stay whole while other frames use the threads", async () => {
    const held = recorder(pool);
    const frames: Array<[number, Uint8Array, number, number]> = [[FrameType.PAGE_DATA, pageData(0, 64), 0, 64]];
    // applied, this one makes the handler hold back what follows
    frames.push([FrameType.VM_BYTES, new Uint8Array([1, 2, 3]), 0, 0]);
    for (let f = 1; f < 6; f++) frames.push([FrameType.PAGE_DATA, pageData(f * 64, 64), f * 64, 64], [FrameType.UNPIN, unpin(f), 0, 0]);
    const want = expected(frames);
    for (const [type, payload] of frames) held.frames.take(type, payload);
    await within(held.reach(want.indexOf(`apply ${FrameType.VM_BYTES} 010203`) + 1), 4_000, "the frames up to the hold applied");
    await within(throughPool(), 4_000, "the held frames' checks done");
    // another connection's frames go through the same threads meanwhile: they must not take the held batches
    const other = recorder(pool);
    const theirs: Array<[number, Uint8Array, number, number]> = Array.from({ length: 12 }, (_, f) => [FrameType.PAGE_DATA, pageData(10_000 + f * 64, 64), 10_000 + f * 64, 64]);
    for (const [type, payload] of theirs) other.frames.take(type, payload);
    await within(other.reach(expected(theirs).length), 4_000, "the other connection's frames applied");
    expect(held.events).toEqual(want.slice(0, want.indexOf(`apply ${FrameType.VM_BYTES} 010203`) + 1));
    held.unblock();
    await within(held.reach(want.length), 4_000, `the held frames applied (${held.events.length} of ${want.length} events)`);
    expect(held.events).toEqual(want);
    expect(other.events).toEqual(expected(theirs));
  });
});

describe("CheckedFrames, as the connection closes", () => {
  test("frames read before the close apply once checked; those held back are left, and later frames go on through the same threads", async () => {
    const r = recorder(pool);
    const frames: Array<[number, Uint8Array, number, number]> = [
      [FrameType.PAGE_DATA, pageData(0, 64), 0, 64],
      [FrameType.CONTROL, new Uint8Array([7]), 0, 0],
      [FrameType.PAGE_DATA, pageData(64, 64), 64, 64],
      [FrameType.VM_BYTES, new Uint8Array([1]), 0, 0],
      [FrameType.PAGE_DATA, pageData(128, 64), 128, 64],
    ];
    const want = expected(frames);
    for (const [type, payload] of frames) r.frames.take(type, payload);
    // the close: the checks in flight end and what they allow applies, up to the hold
    await within(r.frames.whenChecked(), 4_000, "the checks in flight done");
    expect(r.events).toEqual(want.slice(0, want.indexOf(`apply ${FrameType.VM_BYTES} 01`) + 1));
    await within(throughPool(), 4_000, "the held frame's check done");
    r.frames.drop();
    // the held frame's batch was kept and is released by the drop: released twice, the pool would throw, or two connections share it below
    const after = recorder(pool);
    const theirs: Array<[number, Uint8Array, number, number]> = Array.from({ length: 8 }, (_, f) => [FrameType.PAGE_DATA, pageData(20_000 + f * 64, 64), 20_000 + f * 64, 64]);
    for (const [type, payload] of theirs) after.frames.take(type, payload);
    await within(after.reach(expected(theirs).length), 4_000, "a later connection's frames applied");
    expect(after.events).toEqual(expected(theirs));
    expect(r.events.length).toBe(want.indexOf(`apply ${FrameType.VM_BYTES} 01`) + 1);
  });

  test("a page unlike its digest in a frame held back fails the frames when they go on", async () => {
    const r = recorder(pool);
    const good: Array<[number, Uint8Array, number, number]> = [
      [FrameType.VM_BYTES, new Uint8Array([1]), 0, 0],
      [FrameType.PAGE_DATA, pageData(0, 64), 0, 64],
    ];
    for (const [type, payload] of good) r.frames.take(type, payload);
    // applied at once (nothing waited): the handler holds back what follows
    expect(r.events).toEqual([`apply ${FrameType.VM_BYTES} 01`]);
    r.frames.take(FrameType.PAGE_DATA, pageData(64, 64, 70));
    r.frames.take(FrameType.UNPIN, unpin(1));
    await within(throughPool(), 4_000, "the checks done");
    r.unblock();
    expect(r.failures.map((f) => f.kind)).toEqual(["data"]);
    // the good frame went on; nothing of the bad one, nor after it
    expect(r.events).toEqual(expected(good));
  });
});

/** Resolves once a batch submitted now has been through the threads: every batch before it is done. */
function throughPool(): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const b = pool.acquire();
    b.count = 1;
    pool.submit(b, () => resolve(), reject);
  });
}
