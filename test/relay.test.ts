// The relay: its engine over real loopback sockets, with test clients
// speaking the relay frames, and the compiled `sgm relay` command.

import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { RUNTIME_SETTINGS } from "../cli/runtime-settings.ts";
import { DIGEST_BYTES, PAGE_BYTES, digestPage } from "../core/dedup/digest.ts";
import { type Relay, type RelayOptions, startRelay } from "../core/relay/engine.ts";
import { IdSet } from "../core/dedup/id-set.ts";
import { PAUSE_ABOVE } from "../core/relay/session.ts";
import type { Role } from "../core/wire/auth.ts";
import { PeerConnection } from "../core/wire/connection.ts";
import { type Control, decodeControl, encodeControl } from "../core/wire/control.ts";
import { FrameType, maxPayload } from "../core/wire/messages.ts";
import {
  RelayFrame,
  encodeDigestRequest,
  encodeHoldOf,
  encodeKeepOf,
  encodeRelease,
  readAck,
  readHasReply,
  readPages,
} from "../core/wire/relay-messages.ts";
import { probeRate } from "../core/scatter/rate-probe.ts";
import { track } from "./harness/processes.ts";
import { expectExit, runSgm, sgmBinary, sgmEnv, startSgm } from "./harness/sgm.ts";
import { joinDigests, type Page, putPayload } from "./harness/relay-pages.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";

const HOST = "127.0.0.1";
const KEY = "sgm relay test key 0123456789abcdef";
const psk = new TextEncoder().encode(KEY);

function randomPages(count: number): Page[] {
  return Array.from({ length: count }, () => {
    const page = crypto.getRandomValues(new Uint8Array(PAGE_BYTES));
    const digest = new Uint8Array(DIGEST_BYTES);
    digestPage(page, digest);
    return { digest, page };
  });
}

function runId(label: number): Uint8Array {
  return new Uint8Array(16).fill(label);
}

interface Frame {
  type: number;
  payload: Uint8Array;
}

/** A scatter or gather speaking to the relay; frames are kept until a test asks for them. */
class Client {
  readonly conn: PeerConnection;
  /** Every control message received, in order. */
  readonly controls: Control[] = [];
  private readonly frames: Frame[] = [];
  private waiter: { type: number; resolve: (payload: Uint8Array) => void } | undefined;
  private nextReq = 1;

  private constructor(conn: PeerConnection) {
    this.conn = conn;
    conn.onFrame((type, payload) => {
      const frame = { type, payload: payload.slice() };
      if (type === FrameType.CONTROL) this.controls.push(decodeControl(frame.payload));
      if (this.waiter?.type === type) {
        const { resolve } = this.waiter;
        this.waiter = undefined;
        resolve(frame.payload);
      } else {
        this.frames.push(frame);
      }
    });
  }

  static async connect(port: number, role: Role = "scatter"): Promise<Client> {
    const conn = await PeerConnection.connect({ host: HOST, port, psk, role, expectRole: "relay", maxPayload, timeoutMs: 5000 });
    clients.push(conn);
    return new Client(conn);
  }

  /** The next frame of `type`, waiting for it if need be. */
  next(type: number): Promise<Uint8Array> {
    const i = this.frames.findIndex((f) => f.type === type);
    if (i >= 0) return Promise.resolve(this.frames.splice(i, 1)[0]!.payload);
    return new Promise((resolve, reject) => {
      this.waiter = { type, resolve };
      void this.conn.closed.then((reason) => reject(reason ?? new Error("relay closed the connection")));
    });
  }

  /** PUTs the pages under `run`; resolves with the refused bitmap of the ACK. */
  async put(run: Uint8Array, seq: number, pages: readonly Page[]): Promise<boolean[]> {
    this.conn.send(RelayFrame.PUT, putPayload(run, seq, pages));
    const ack = readAck(await this.next(RelayFrame.ACK));
    expect(ack.seq).toBe(seq);
    return ack.refused;
  }

  /** GETs the digests for `run`; each page found, or undefined. */
  async get(run: Uint8Array, pages: readonly Page[]): Promise<Array<Uint8Array | undefined>> {
    const req = this.nextReq++;
    this.conn.send(RelayFrame.GET, encodeDigestRequest(run, req, joinDigests(pages)));
    const payload = await this.next(RelayFrame.PAGES);
    const found: Array<Uint8Array | undefined> = [];
    const replyReq = readPages(payload, (digestAt, pageAt) => {
      expect(payload.subarray(digestAt, digestAt + DIGEST_BYTES)).toEqual(pages[found.length]!.digest);
      found.push(pageAt < 0 ? undefined : payload.slice(pageAt, pageAt + PAGE_BYTES));
    });
    expect(replyReq).toBe(req);
    return found;
  }

  async has(run: Uint8Array, pages: readonly Page[]): Promise<boolean[]> {
    const req = this.nextReq++;
    this.conn.send(RelayFrame.HAS, encodeDigestRequest(run, req, joinDigests(pages)));
    const reply = readHasReply(await this.next(RelayFrame.HAS_REPLY));
    expect(reply.req).toBe(req);
    return reply.held;
  }

  /** HOLDs under `run` the pages' digests `keeper` keeps; resolves with the refused bitmap of the ACK. */
  async hold(run: Uint8Array, keeper: Uint8Array, seq: number, pages: readonly Page[]): Promise<boolean[]> {
    this.conn.send(RelayFrame.HOLD, encodeHoldOf(putPayload(run, seq, pages), keeper));
    const ack = readAck(await this.next(RelayFrame.ACK));
    expect(ack.seq).toBe(seq);
    return ack.refused;
  }

  /** KEEPs for `keeper` the pages `run` holds (not answered: stats() after it waits for it). */
  keep(keeper: Uint8Array, run: Uint8Array, pages: readonly Page[]): void {
    this.conn.send(RelayFrame.KEEP, encodeKeepOf(keeper, putPayload(run, 0, pages)));
  }

  /** Has the relay drop what it keeps for `keeper`; resolves with how many pages that was. */
  async unkeep(keeper: Uint8Array): Promise<number> {
    this.conn.send(FrameType.CONTROL, encodeControl({ t: "relay-unkeep", run: Buffer.from(keeper).toString("hex") }));
    for (;;) {
      const message = decodeControl(await this.next(FrameType.CONTROL));
      if (message.t === "relay-unkept") return message.pages;
    }
  }

  release(run: Uint8Array, pages: readonly Page[]): void {
    this.conn.send(RelayFrame.RELEASE, encodeRelease(run, joinDigests(pages)));
  }

  /** Reserves room for the run; resolves with what the relay granted. */
  async reserve(run: Uint8Array, bytes: number): Promise<number> {
    this.conn.send(FrameType.CONTROL, encodeControl({ t: "relay-reserve", run: Buffer.from(run).toString("hex"), bytes }));
    for (;;) {
      const message = decodeControl(await this.next(FrameType.CONTROL));
      if (message.t === "relay-reserved") return message.bytes;
    }
  }

  /** Asks for the relay's figures (its room as `run` sees it); since replies come in order, this also waits for every earlier request. */
  async stats(run?: Uint8Array): Promise<Extract<Control, { t: "relay-stats" }>> {
    this.conn.send(FrameType.CONTROL, encodeControl({ t: "relay-stats?", run: run ? Buffer.from(run).toString("hex") : "" }));
    for (;;) {
      const message = decodeControl(await this.next(FrameType.CONTROL));
      if (message.t === "relay-stats") return message;
    }
  }
}

const relays: Relay[] = [];
const clients: PeerConnection[] = [];
let logs: string[] = [];
/** The engine tests run twice: PUTs checked on the relay's thread, then on digest threads. */
let digestThreads = 0;

function relay(options: Partial<RelayOptions> = {}): Relay {
  const r = startRelay({ host: HOST, port: 0, psk, capacityBytes: 64 << 20, ttlMs: 60_000, digestThreads, log: (line) => logs.push(line), ...options });
  relays.push(r);
  return r;
}

afterEach(async () => {
  for (const conn of clients.splice(0)) conn.abort();
  await Promise.all(relays.splice(0).map((r) => r.close()));
  logs = [];
});

async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: Timer | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms)));
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

describe("a run's held ids", () => {
  test("add, delete, has, size and iteration agree with a Set over random operations, growing as ids do", () => {
    const ids = new IdSet();
    const reference = new Set<number>();
    let seed = 7;
    const next = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0);
    for (let n = 0; n < 50_000; n++) {
      const id = next() % (n < 25_000 ? 5_000 : 300_000);
      if (next() % 3 === 0) expect(ids.delete(id)).toBe(reference.delete(id));
      else expect(ids.add(id)).toBe(!reference.has(id) && reference.add(id) !== undefined);
      expect(ids.has(id)).toBe(reference.has(id));
    }
    expect(ids.size).toBe(reference.size);
    expect([...ids]).toEqual([...reference].sort((a, b) => a - b));
    expect(ids.has(10_000_000)).toBe(false);
    expect(ids.delete(10_000_000)).toBe(false);
  });
});

describe.each([0, 2])("relay engine, PUTs checked on %d digest threads", (threads) => {
  beforeEach(() => {
    digestThreads = threads;
  });

  test("a page put by a scatter comes back to a gather byte for byte; unknown digests are not found", async () => {
    const r = relay();
    const scatter = await Client.connect(r.port, "scatter");
    const pages = randomPages(100);
    expect(await scatter.put(runId(1), 0, pages.slice(0, 64))).toEqual(Array(64).fill(false));
    expect(await scatter.put(runId(1), 1, pages.slice(64))).toEqual(Array(36).fill(false));

    const gather = await Client.connect(r.port, "gather");
    const [unknown] = randomPages(1);
    const asked = [...pages, unknown!];
    const got = await gather.get(runId(1), asked);
    expect(got.length).toBe(101);
    pages.forEach((p, i) => expect(got[i]).toEqual(p.page));
    expect(got[100]).toBeUndefined();

    expect(await gather.has(runId(1), [pages[3]!, unknown!, pages[99]!])).toEqual([true, false, true]);
    const stats = await gather.stats();
    expect(stats).toMatchObject({ pages: 100, used: 100 * PAGE_BYTES, bytesIn: 100 * PAGE_BYTES, bytesOut: 100 * PAGE_BYTES, runs: 1 });
  });

  test("beyond capacity puts are refused in the ACK, relay-full comes once, and held content is still accepted", async () => {
    const r = relay({ capacityBytes: 4 * PAGE_BYTES });
    const scatter = await Client.connect(r.port);
    const pages = randomPages(8);
    expect(await scatter.put(runId(1), 0, pages.slice(0, 6))).toEqual([false, false, false, false, true, true]);
    // Another run's put of a page the relay holds takes no memory, so it is accepted; new content is not.
    expect(await scatter.put(runId(2), 1, [pages[0]!, pages[6]!, pages[7]!])).toEqual([false, true, true]);

    const stats = await scatter.stats();
    expect(stats).toMatchObject({ capacity: 4 * PAGE_BYTES, used: 4 * PAGE_BYTES, pages: 4, runs: 2, bytesIn: 5 * PAGE_BYTES });
    const full = scatter.controls.filter((c) => c.t === "relay-full");
    expect(full).toEqual([{ t: "relay-full", capacity: 4 * PAGE_BYTES, used: 4 * PAGE_BYTES }]);
    expect(r.stats().refusedPages).toBe(4);

    // The refused pages are not there, the accepted ones are.
    const gather = await Client.connect(r.port, "gather");
    expect((await gather.get(runId(1), pages)).map((p) => p !== undefined)).toEqual([true, true, true, true, false, false, false, false]);
  });

  test("room a run reserved is set aside from other runs until it fills it or gives it back; the store never passes its capacity", async () => {
    const r = relay({ capacityBytes: 8 * PAGE_BYTES });
    const scatter = await Client.connect(r.port);
    const pages = randomPages(12);
    expect(await scatter.reserve(runId(1), 5 * PAGE_BYTES)).toBe(5 * PAGE_BYTES);
    expect(await scatter.stats(runId(2))).toMatchObject({ free: 3 * PAGE_BYTES, reserved: 5 * PAGE_BYTES, runs: 1 });
    expect(await scatter.stats(runId(1))).toMatchObject({ free: 8 * PAGE_BYTES });
    // another run gets only what is not reserved
    expect(await scatter.put(runId(2), 0, pages.slice(0, 4))).toEqual([false, false, false, true]);
    // a second reservation gets what is left; the first run still fills all of its own
    expect(await scatter.reserve(runId(3), 4 * PAGE_BYTES)).toBe(0);
    expect(await scatter.put(runId(1), 1, pages.slice(4, 9))).toEqual([false, false, false, false, false]);
    expect(await scatter.stats(runId(2))).toMatchObject({ used: 8 * PAGE_BYTES, free: 0, reserved: 0 });
    expect(await scatter.put(runId(1), 2, pages.slice(9, 10))).toEqual([true]);
    expect(r.stats()).toMatchObject({ used: 8 * PAGE_BYTES, peakUsed: 8 * PAGE_BYTES });

    // a reservation not yet filled goes back with a reservation of 0
    const gather = await Client.connect(r.port, "gather");
    gather.release(runId(1), pages.slice(4, 9));
    // no more than its room: 8 pages less the other run's 3
    expect(await scatter.reserve(runId(1), 6 * PAGE_BYTES)).toBe(5 * PAGE_BYTES);
    expect(await scatter.stats(runId(2))).toMatchObject({ free: 0, reserved: 5 * PAGE_BYTES });
    expect(await scatter.reserve(runId(1), 0)).toBe(0);
    expect(await scatter.stats(runId(2))).toMatchObject({ free: 5 * PAGE_BYTES, reserved: 0, runs: 1 });
  });

  test("a reservation alone keeps its run until the TTL, then it is dropped", async () => {
    // a TTL well above any stall of this process between the reservation and the stats that follow it
    const r = relay({ capacityBytes: 8 * PAGE_BYTES, ttlMs: 1000 });
    const scatter = await Client.connect(r.port);
    await scatter.reserve(runId(1), 8 * PAGE_BYTES);
    expect(await scatter.stats(runId(2))).toMatchObject({ free: 0, runs: 1 });
    await within(
      (async () => {
        while ((await scatter.stats(runId(2))).free === 0) await Bun.sleep(50);
      })(),
      5000,
      "the reservation of a run idle past its TTL was not dropped",
    );
    expect(r.stats()).toMatchObject({ runs: 0, reserved: 0, expiredRuns: 1 });
  });

  test("rate probes are acknowledged, and a relay held to a rate takes them no faster", async () => {
    const limit = 20 << 20;
    const r = relay({ maxRate: limit });
    const prober = await Client.connect(r.port);
    const rate = await within(probeRate(prober.conn, "the relay", 1000), 15_000, "the rate probe did not finish");
    expect(rate).toBeGreaterThan(0);
    // the bucket's burst and one chunk in flight are all it can gain over a second
    expect(rate).toBeLessThan(limit * 1.25);
    expect(await (await Client.connect(r.port)).stats()).toMatchObject({ maxRate: limit, used: 0 });
  });

  test("a release frees a run's pages, but a page held by two runs stays until both release it", async () => {
    const r = relay();
    const scatter = await Client.connect(r.port);
    const [solo, shared, twice] = randomPages(3) as [Page, Page, Page];
    await scatter.put(runId(1), 0, [solo, shared, twice]);
    await scatter.put(runId(2), 1, [shared]);
    // Put again by the same run: still one hold, so one release frees it.
    await scatter.put(runId(1), 2, [twice, twice]);

    const gather = await Client.connect(r.port, "gather");
    gather.release(runId(1), [solo, shared, twice]);
    expect((await gather.get(runId(2), [solo, shared, twice])).map((p) => p !== undefined)).toEqual([false, true, false]);
    expect(await gather.stats()).toMatchObject({ pages: 1, runs: 1 });

    // Releasing again, or for a run the relay does not know, changes nothing.
    gather.release(runId(1), [solo, shared, twice]);
    gather.release(runId(9), [shared]);
    expect(await gather.has(runId(2), [shared])).toEqual([true]);

    gather.release(runId(2), [shared]);
    expect(await gather.get(runId(2), [shared])).toEqual([undefined]);
    expect(await gather.stats()).toMatchObject({ pages: 0, used: 0, runs: 0 });
  });

  test("a HOLD takes a hold for its run on pages its evacuation's keeper keeps, refuses the rest, and is answered in order with PUTs", async () => {
    const r = relay();
    const scatter = await Client.connect(r.port);
    const keeper = runId(7);
    const [a, b, unknown, c] = randomPages(4) as [Page, Page, Page, Page];
    await scatter.put(runId(1), 0, [a, b]);
    scatter.keep(keeper, runId(1), [a, b]);
    // another run: a PUT, and a HOLD sent before that PUT is answered (on digest threads it waits for the PUT's check)
    scatter.conn.send(RelayFrame.PUT, putPayload(runId(2), 0, [c]));
    scatter.conn.send(RelayFrame.HOLD, encodeHoldOf(putPayload(runId(2), 1, [a, unknown, b]), keeper));
    const first = readAck(await scatter.next(RelayFrame.ACK));
    const second = readAck(await scatter.next(RelayFrame.ACK));
    expect([first.seq, first.refused, second.seq, second.refused]).toEqual([0, [false], 1, [false, true, false]]);
    expect(await scatter.stats()).toMatchObject({ pages: 3, runs: 2 });

    // run 1's gather lets go: what run 2 holds stays, by digest, for run 2's gather
    const gather = await Client.connect(r.port, "gather");
    gather.release(runId(1), [a, b]);
    expect(await gather.get(runId(2), [a, b])).toEqual([a.page, b.page]);
    gather.release(runId(2), [a, b, c]);
    // a and b stay while the keeper keeps them, as spare; c goes
    expect(await gather.stats()).toMatchObject({ pages: 2, runs: 0 });
    expect(await scatter.unkeep(keeper)).toBe(2);
    expect(await scatter.stats()).toMatchObject({ pages: 0, used: 0, runs: 0 });
    // nothing left to hold
    expect(await scatter.hold(runId(3), keeper, 2, [a])).toEqual([true]);
  });

  test("runs sharing a relay and its key are isolated: another run's pages cannot be read, held, kept or released without its id", async () => {
    const r = relay();
    const owner = await Client.connect(r.port);
    const rogue = await Client.connect(r.port, "gather");
    const [mine, shared] = randomPages(2) as [Page, Page];
    const keeper = runId(7);
    await owner.put(runId(1), 0, [mine, shared]);
    owner.keep(keeper, runId(1), [mine, shared]);
    // a peer with the key and the digests, but not the run's id nor the keeper's
    expect(await rogue.get(runId(66), [mine, shared])).toEqual([undefined, undefined]);
    expect(await rogue.has(runId(66), [mine, shared])).toEqual([false, false]);
    expect(await rogue.hold(runId(66), runId(67), 0, [mine])).toEqual([true]);
    // a KEEP for its own keeper of what its run does not hold keeps nothing, so a HOLD through it is refused too
    rogue.keep(runId(67), runId(66), [mine]);
    expect(await rogue.hold(runId(66), runId(67), 1, [mine])).toEqual([true]);
    rogue.release(runId(66), [mine, shared]);
    expect(await rogue.unkeep(runId(67))).toBe(0);
    // a run that puts the same content holds its own copy of the reference, and reads only that
    await rogue.put(runId(66), 2, [shared]);
    expect(await rogue.get(runId(66), [mine, shared])).toEqual([undefined, shared.page]);
    // the owner's run is whole
    expect(await owner.get(runId(1), [mine, shared])).toEqual([mine.page, shared.page]);
    expect(await owner.stats()).toMatchObject({ pages: 2, runs: 2 });
  });

  test("what a keeper keeps outlives its run's release for another run's HOLD, is free room a new page takes, and goes with relay-unkeep", async () => {
    const r = relay({ capacityBytes: 4 * PAGE_BYTES });
    const scatter = await Client.connect(r.port);
    const gather = await Client.connect(r.port, "gather");
    const keeper = runId(7);
    const [a, b, c, d, e, f] = randomPages(6) as [Page, Page, Page, Page, Page, Page];
    await scatter.put(runId(1), 0, [a, b, c]);
    scatter.keep(keeper, runId(1), [a, b, c, d]);
    gather.release(runId(1), [a, b, c]);
    // no run holds them: still there, as spare, and counted as room (the gather's stats come after its release)
    expect(await gather.stats(runId(2))).toMatchObject({ pages: 3, runs: 0, free: 4 * PAGE_BYTES });
    expect(r.stats()).toMatchObject({ spare: 3 * PAGE_BYTES });
    // another run holds one for its gather (no longer spare), and puts three new pages: two take spare slots
    expect(await scatter.hold(runId(2), keeper, 0, [a])).toEqual([false]);
    expect(await scatter.put(runId(2), 1, [d, e, f])).toEqual([false, false, false]);
    const stats = await scatter.stats(runId(2));
    expect(stats).toMatchObject({ pages: 4, used: 4 * PAGE_BYTES });
    expect(r.stats().spare).toBe(0);
    expect(await gather.get(runId(2), [a, d, e, f])).toEqual([a.page, d.page, e.page, f.page]);
    // run 2 lets go of all: a is still kept (spare again), though no run may read it; the rest go
    gather.release(runId(2), [a, d, e, f]);
    expect(await gather.has(runId(2), [a, b, c, d, e, f])).toEqual([false, false, false, false, false, false]);
    expect(r.stats()).toMatchObject({ pages: 1, spare: PAGE_BYTES });
    // unkeep counts what was still kept: a (d was not there when the KEEP came; b and c gave up their slots)
    expect(await scatter.unkeep(keeper)).toBe(1);
    expect(await scatter.stats()).toMatchObject({ pages: 0, used: 0, runs: 0 });
    expect(r.stats().spare).toBe(0);
  });

  test("an idle run's pages go when its TTL passes; a run kept alive by empty releases keeps its pages", async () => {
    // Kept alive every 100 ms against a TTL of 1 s: a stall of this process (relay and clients alike) must last
    // 900 ms to drop the live run. It is put 600 ms before the idle one, so that were the empty releases to keep
    // nothing alive, the sweeps (every 250 ms) would drop it first.
    const r = relay({ ttlMs: 1000 });
    const scatter = await Client.connect(r.port);
    const gather = await Client.connect(r.port, "gather");
    const [idle, alive] = randomPages(2) as [Page, Page];
    await scatter.put(runId(2), 1, [alive]);
    const keepAlive = setInterval(() => gather.release(runId(2), []), 100);
    try {
      await Bun.sleep(600);
      await scatter.put(runId(1), 0, [idle]);
      await within(
        (async () => {
          while (r.stats().expiredRuns === 0) await Bun.sleep(50);
        })(),
        10_000,
        "the idle run was not dropped",
      );
    } finally {
      clearInterval(keepAlive);
    }
    expect((await gather.get(runId(1), [idle])).map((p) => p !== undefined)).toEqual([false]);
    expect((await gather.get(runId(2), [alive])).map((p) => p !== undefined)).toEqual([true]);
    expect(r.stats()).toMatchObject({ pages: 1, runs: 1, expiredRuns: 1 });
    expect(logs.some((line) => line.includes(`run ${"01".repeat(16)} idle`))).toBe(true);
  });

  test("a PUT whose page does not match its digest drops that connection and stores nothing from it", async () => {
    const r = relay();
    const good = await Client.connect(r.port);
    const bad = await Client.connect(r.port);
    const pages = randomPages(3);
    const forged = { digest: pages[2]!.digest, page: pages[1]!.page };
    bad.conn.send(RelayFrame.PUT, putPayload(runId(1), 7, [pages[0]!, forged]));
    expect(await within(bad.conn.closed, 5000, "the relay dropping the forger")).toBeUndefined();

    expect(await good.put(runId(2), 0, [pages[2]!])).toEqual([false]);
    expect((await good.get(runId(2), pages)).map((p) => p !== undefined)).toEqual([false, false, true]);
    expect(await good.has(runId(1), pages)).toEqual([false, false, false]);
    expect(await good.stats()).toMatchObject({ pages: 1, runs: 1 });
    expect(logs.some((line) => /scatter dropped: 127\.0\.0\.1:\d+: relay PUT 7: page 1 does not match its digest/.test(line))).toBe(true);
  });

  test.each([
    ["a PAGE_MAP frame", FrameType.PAGE_MAP, new Uint8Array(8), /frame type 18 \(PAGE_MAP\) is not a relay request/],
    ["an ACK frame", RelayFrame.ACK, new Uint8Array(8), /frame type 21 \(ACK\) is not a relay request/],
    ["a control message for a gather", FrameType.CONTROL, encodeControl({ t: "switch-go", vm: 0 }), /control message 'switch-go' is not a relay request/],
    ["a truncated PUT", RelayFrame.PUT, new Uint8Array(30), /relay PUT of 30 bytes does not hold 0 pages/],
    ["a GET of too many digests", RelayFrame.GET, new Uint8Array([...runId(1), 0, 0, 0, 1, 0, 0, 1, 1]), /relay GET of 24 bytes does not hold 257 digests/],
  ])("%s drops only the connection that sent it", async (_what, type, payload, message) => {
    const r = relay();
    const scatter = await Client.connect(r.port);
    const pages = randomPages(2);
    await scatter.put(runId(1), 0, pages);
    const rogue = await Client.connect(r.port, "gather");
    rogue.conn.send(type, payload);
    await within(rogue.conn.closed, 5000, "the relay dropping the sender");
    expect(logs.some((line) => message.test(line))).toBe(true);
    expect(await scatter.get(runId(1), pages)).toEqual(pages.map((p) => p.page));
    expect(r.stats().connections).toBe(1);
  });

  test("a client that does not read its replies does not make the relay queue them without bound", async () => {
    const r = relay();
    const scatter = await Client.connect(r.port);
    const pages = randomPages(256);
    for (let seq = 0; seq < 4; seq++) await scatter.put(runId(1), seq, pages.slice(seq * 64, seq * 64 + 64));

    const gather = await PeerConnection.connect({ host: HOST, port: r.port, psk, role: "gather", maxPayload, timeoutMs: 5000 });
    clients.push(gather);
    let replies = 0;
    let lastReply = new Uint8Array(0);
    gather.onFrame((type, payload) => {
      if (type !== RelayFrame.PAGES) return;
      replies++;
      lastReply = payload.slice();
    });
    gather.pauseReading();
    const requests = 200; // 200 MiB of replies
    const digests = joinDigests(pages);
    for (let req = 0; req < requests; req++) gather.send(RelayFrame.GET, encodeDigestRequest(runId(1), req, digests));

    // it queues replies for the client that does not read, then stops reading its requests
    let maxQueued = 0;
    for (const until = Date.now() + 20_000; maxQueued <= PAUSE_ABOVE && Date.now() < until; ) {
      maxQueued = Math.max(maxQueued, r.stats().queuedBytes);
      await Bun.sleep(5);
    }
    expect(maxQueued).toBeGreaterThan(PAUSE_ABOVE);
    for (const until = Date.now() + 300; Date.now() < until; ) {
      maxQueued = Math.max(maxQueued, r.stats().queuedBytes);
      await Bun.sleep(5);
    }
    expect(maxQueued).toBeLessThan(16 << 20);
    expect(r.stats().bytesOut).toBeLessThan((requests * 256 * PAGE_BYTES) / 4);

    // Once the client reads again, every reply comes, in order.
    gather.resumeReading();
    for (const until = Date.now() + 20_000; replies < requests && Date.now() < until; ) await Bun.sleep(10);
    expect(replies).toBe(requests);
    expect(readPages(lastReply, () => {})).toBe(requests - 1);
    expect(r.stats().bytesOut).toBe(requests * 256 * PAGE_BYTES);
  });

  test("close() ends every connection and resolves closed", async () => {
    const r = relay();
    const scatter = await Client.connect(r.port);
    await scatter.put(runId(1), 0, randomPages(1));
    await within(r.close(), 3000, "close");
    await within(r.closed, 100, "closed");
    await within(scatter.conn.closed, 3000, "the client's connection closing");
    expect(r.stats().connections).toBe(0);
  });

  test("an abort of its signal stops the relay", async () => {
    const abort = new AbortController();
    const r = relay({ signal: abort.signal });
    abort.abort();
    await within(r.closed, 3000, "closed");
  });
});

/** dist/sgm relay on a free port with `flags`, its key written in `dir`, once it has said on --ready-fd that it listens. */
async function readyRelay(dir: string, flags: string[], env: Record<string, string> = {}) {
  const pskFile = `${dir}/psk`;
  await Bun.write(pskFile, `${KEY}\n`);
  const args = ["relay", "--listen", "127.0.0.1:0", "--psk-file", pskFile, "--ready-fd", "3", ...flags];
  const proc = track(Bun.spawn([await sgmBinary(), ...args], { stdio: ["ignore", "pipe", "pipe", "pipe"], env: sgmEnv(env) }));
  const stdout = new Response(proc.stdout).text();
  const stderr = new Response(proc.stderr).text();
  const ready = await within(Bun.file(proc.stdio[3] as number).text(), 30_000, "the ready line");
  const m = /^ready 127\.0\.0\.1:(\d+)\n$/.exec(ready);
  expect(m).not.toBeNull();
  return { proc, port: Number(m![1]), stdout, stderr, pskFile };
}

describe("sgm relay", () => {
  test("announces itself on --ready-fd, serves a put and a get, and exits 0 at once on SIGINT with its figures", async () => {
    const dir = makeTempDir("relay");
    try {
      const { proc, port, stdout, stderr } = await readyRelay(dir, ["--capacity", "64MiB", "--json"]);

      const scatter = await Client.connect(port);
      const pages = randomPages(10);
      expect(await scatter.put(runId(1), 0, pages)).toEqual(Array(10).fill(false));
      expect(await scatter.get(runId(1), pages)).toEqual(pages.map((p) => p.page));
      scatter.conn.close();

      proc.kill("SIGINT");
      expect(await within(proc.exited, 10_000, "exit after SIGINT")).toBe(0);
      const report = JSON.parse(await stdout) as Record<string, number>;
      expect(report).toMatchObject({ capacity: 64 << 20, pages: 10, bytesIn: 10 * PAGE_BYTES, bytesOut: 10 * PAGE_BYTES, runs: 1 });
      const err = await stderr;
      expect(err).toMatch(/^sgm: relay listening on 127\.0\.0\.1:\d+ \(capacity 64\.0 MiB\)$/m);
      expect(err).toMatch(/^sgm: relay stopped: held 40\.0 KiB of 64\.0 MiB \(10 pages, 1 runs; at most 40\.0 KiB\)/m);
    } finally {
      removeDir(dir);
    }
  });

  test("runs itself again with every runtime setting, keeping the one the operator set as they set it", async () => {
    const dir = makeTempDir("relay-settings");
    try {
      const { proc } = await readyRelay(dir, ["--capacity", "64MiB"], { MIMALLOC_PURGE_DELAY: "5" });
      const child = readFileSync(`/proc/${proc.pid}/task/${proc.pid}/children`, "utf8").trim();
      const environ = readFileSync(`/proc/${child}/environ`, "utf8").split("\0");
      const env = new Map(environ.filter((line) => line.includes("=")).map((line) => [line.slice(0, line.indexOf("=")), line.slice(line.indexOf("=") + 1)]));
      expect(env.get("MIMALLOC_PURGE_DELAY")).toBe("5");
      const others = Object.entries(RUNTIME_SETTINGS).filter(([name]) => name !== "MIMALLOC_PURGE_DELAY");
      expect(others.length).toBeGreaterThan(0);
      for (const [name, value] of others) expect(env.get(name)).toBe(value);
      proc.kill("SIGINT");
      expect(await within(proc.exited, 10_000, "exit after SIGINT")).toBe(0);
    } finally {
      removeDir(dir);
    }
  });

  test("--prealloc makes the whole capacity resident before it listens, and serves from it; SIGINT meanwhile stops it unlistened (130); a capacity beyond the host's memory exits 78 on one line", async () => {
    const dir = makeTempDir("relay-prealloc");
    try {
      const { proc, port, stderr, pskFile } = await readyRelay(dir, ["--capacity", "256MiB", "--prealloc"]);
      // the relay is the child sgm runs itself as (cli/runtime-settings.ts); nothing is stored yet
      const child = readFileSync(`/proc/${proc.pid}/task/${proc.pid}/children`, "utf8").trim();
      const rssKiB = Number(/^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${child}/status`, "utf8"))?.[1]);
      expect(rssKiB).toBeGreaterThanOrEqual(256 * 1024);

      const scatter = await Client.connect(port);
      const pages = randomPages(300);
      expect(await scatter.put(runId(1), 0, pages.slice(0, 64))).toEqual(Array(64).fill(false));
      expect(await scatter.put(runId(1), 1, pages.slice(64, 128))).toEqual(Array(64).fill(false));
      expect(await scatter.get(runId(1), pages.slice(0, 128))).toEqual(pages.slice(0, 128).map((p) => p.page));
      scatter.conn.close();
      proc.kill("SIGINT");
      expect(await within(proc.exited, 10_000, "exit after SIGINT")).toBe(0);
      expect(await stderr).toMatch(/^sgm: making 256\.0 MiB resident for pages \(--prealloc\)\nsgm: made 256\.0 MiB resident in \d+\.\d s\nsgm: relay listening on /m);

      const r = await runSgm(["relay", "--listen", "127.0.0.1:0", "--capacity", "1000TiB", "--psk-file", pskFile, "--prealloc"]);
      expectExit(r, 78);
      expect(r.stderr).toMatch(/^sgm: error: --prealloc: the capacity, 1000\.0 TiB, is more than the [\d.]+ [KMG]iB of memory this host has available\n$/);

      // SIGINT while it makes its capacity resident: it stops there, and never listens
      const slow = await startSgm(["relay", "--listen", "127.0.0.1:0", "--capacity", "4GiB", "--psk-file", pskFile, "--prealloc"]);
      await slow.waitStderr(/making 4\.0 GiB resident for pages/, 10_000);
      slow.proc.kill("SIGINT");
      const stopped = await within(slow.result(), 10_000, "exit after SIGINT");
      expectExit(stopped, 130);
      expect(stopped.stderr).toMatch(/^sgm: error: interrupted by SIGINT$/m);
      expect(stopped.stderr).not.toMatch(/relay listening|made 4\.0 GiB resident/);
    } finally {
      removeDir(dir);
    }
  });

  test.each([
    [["--capacity", "lots"], "--capacity 'lots': expected a size such as 8GiB or 512MiB"],
    [["--capacity", "100"], "--capacity '100': less than one 4096-byte page"],
    [["--capacity", "1GiB", "--ttl", "0"], "--ttl '0': expected a whole number from 1 to 2592000"],
    [["--capacity", "1GiB", "--ready-fd", "1"], "--ready-fd '1': expected a whole number from 3 to 65535"],
    [["--capacity", "1GiB", "--ready-fd", "99"], "--ready-fd 99: not an open file descriptor"],
    [["--listen", "0.0.0.0"], "--listen '0.0.0.0': expected HOST:PORT"],
  ])("usage error %j exits 2 on one line", async (flags, message) => {
    const dir = makeTempDir("relay-usage");
    try {
      await Bun.write(`${dir}/psk`, `${KEY}\n`);
      const base: Record<string, string> = { "--listen": "127.0.0.1:0", "--capacity": "1GiB", "--psk-file": `${dir}/psk` };
      for (let i = 0; i < flags.length; i += 2) base[flags[i]!] = flags[i + 1]!;
      const r = await runSgm(["relay", ...Object.entries(base).flat()]);
      expectExit(r, 2);
      expect(r.stdout).toBe("");
      expect(r.stderr).toBe(`sgm: error: ${message}\n`);
    } finally {
      removeDir(dir);
    }
  });

  test("--http serves /metrics and /healthz; SIGTERM drains: no new run, the held run finishes, then it exits 0", async () => {
    const dir = makeTempDir("relay-http");
    try {
      const pskFile = `${dir}/psk`;
      await Bun.write(pskFile, `${KEY}\n`);
      const relay = await startSgm(["relay", "--listen", "127.0.0.1:0", "--capacity", "64MiB", "--psk-file", pskFile, "--http", "127.0.0.1:0", "--json"]);
      const m = await relay.waitStderr(/relay listening on 127\.0\.0\.1:(\d+) .*; metrics on (http:\/\/127\.0\.0\.1:\d+)\/metrics/);
      const port = Number(m[1]);
      const base = m[2]!;
      expect(await (await fetch(`${base}/healthz`)).text()).toBe("ok\n");

      const scatter = await Client.connect(port);
      const pages = randomPages(10);
      expect(await scatter.put(runId(1), 0, pages)).toEqual(Array(10).fill(false));
      const metrics = await (await fetch(`${base}/metrics`)).text();
      expect(metrics).toMatch(/^sgm_relay_held_pages 10$/m);
      expect(metrics).toMatch(/^sgm_relay_put_bytes_total 40960$/m);
      expect(metrics).toMatch(/^sgm_relay_capacity_bytes 67108864$/m);
      expect(metrics).toMatch(/^sgm_relay_runs 1$/m);
      expect(metrics).toMatch(/^# TYPE sgm_relay_put_bytes_total counter$/m);

      relay.proc.kill("SIGTERM");
      await relay.waitStderr(/draining: no new runs; waiting for the 1 held to finish/, 10_000);
      expect((await fetch(`${base}/healthz`)).status).toBe(503);
      // a run it does not hold is refused; the one it holds still puts and gets
      expect(await scatter.put(runId(2), 1, randomPages(1))).toEqual([true]);
      const more = randomPages(1);
      expect(await scatter.put(runId(1), 2, more)).toEqual([false]);
      scatter.conn.close();
      const gather = await Client.connect(port, "gather");
      expect(await gather.get(runId(1), pages)).toEqual(pages.map((p) => p.page));
      expect(relay.proc.exitCode).toBeNull();

      // once its last run is released, with no scatter connected, it ends by itself
      gather.release(runId(1), [...pages, ...more]);
      const r = await within(relay.result(), 10_000, "the drained relay did not exit");
      expectExit(r, 0);
      expect(r.stderr).toMatch(/drained: every run it held has finished/);
      expect(JSON.parse(r.stdout)).toMatchObject({ pages: 0, runs: 0, refusedPages: 1, bytesIn: 11 * PAGE_BYTES });
    } finally {
      removeDir(dir);
    }
  });
});
