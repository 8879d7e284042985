// Hostile input, for a fixed time each (SGM_FUZZ_SECONDS, 3 by default;
// `make soak` runs longer): random and mutated frames at a relay from peers
// holding the key, mutated QEMU streams at the stream reader, and random
// replies at the QMP client. None may crash or hang, grow without bound, or
// take a page that fails its digest. Each prints its seed; SGM_FUZZ_SEED
// runs the same sequence again.

import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { DIGEST_BYTES, PAGE_BYTES, digestPage } from "../core/dedup/digest.ts";
import { SgmError } from "../core/errors.ts";
import { PostcopyStreamWriter } from "../core/qemu/postcopy-writer.ts";
import type { ReaderHandler } from "../core/qemu/reader-handler.ts";
import { MigrationStreamReader } from "../core/qemu/stream-reader.ts";
import { MAX_QMP_LINE, QmpClient } from "../core/qmp/client.ts";
import { runGather } from "../core/gather/engine.ts";
import { type Relay, startRelay } from "../core/relay/engine.ts";
import { decodeControl, encodeControl } from "../core/wire/control.ts";
import { FrameType } from "../core/wire/messages.ts";
import { probeHeader, ProbeFrame } from "../core/wire/probe-frames.ts";
import {
  RelayFrame,
  encodeDigestRequest,
  encodeHoldOf,
  encodeKeepOf,
  encodeRelease,
  readAck,
  readPages,
} from "../core/wire/relay-messages.ts";
import { captureStream } from "./harness/capture.ts";
import { eventually, fuzzBudgetMs, fuzzSeed, mutate, Rng, rawSession, type RawSession } from "./harness/fuzz.ts";
import { ModelDestinationQemu } from "./harness/model/destination-qemu.ts";
import { recordScatterFrames } from "./harness/model/eviction.ts";
import type { SourceScript } from "./harness/model/source-qemu.ts";
import { killAll } from "./harness/processes.ts";
import { TestVm } from "./harness/qemu.ts";
import { joinDigests, type Page, putPayload } from "./harness/relay-pages.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";
import { within } from "./harness/within.ts";

const psk = new TextEncoder().encode("sgm fuzz test key 0123456789abcdef");
/** The relay fuzz uses three runs and one keeper. */
const runOf = (n: number) => new Uint8Array(16).fill(n);
const KEEPER = runOf(9);
/** A run no fuzzed frame names: a clean peer's pages under it must come through the fuzz intact. */
const WITNESS = runOf(7);
const budgetMs = fuzzBudgetMs();

let dir: string;
const helpersWere = process.env.SGM_HASH_HELPERS;
beforeAll(() => {
  dir = makeTempDir("fuzz");
  // a relay's or gather's digest threads hash copies in batches here, whose order under hostile frames is what needs the fuzz: helpers hash as the thread alone does
  process.env.SGM_HASH_HELPERS = "0";
});
afterAll(async () => {
  if (helpersWere === undefined) delete process.env.SGM_HASH_HELPERS;
  else process.env.SGM_HASH_HELPERS = helpersWere;
  await killAll();
  removeDir(dir);
});

/** Runs `round` until the budget is spent; a failure names the seed and the round. */
async function fuzz(what: string, round: (rng: Rng, n: number) => Promise<void> | void): Promise<number> {
  const seed = fuzzSeed();
  const rng = new Rng(seed);
  const until = performance.now() + budgetMs;
  let n = 0;
  try {
    for (; performance.now() < until; n++) await round(rng, n);
  } catch (err) {
    throw new Error(`${what}, seed ${seed} (SGM_FUZZ_SEED=${seed}), round ${n}: ${(err as Error).message}`, { cause: err });
  }
  console.log(`${what}: ${n} rounds in ${budgetMs / 1000} s, seed ${seed}`);
  return n;
}

// ---- relay ----------------------------------------------------------------------

/** A few contents only, so that PUT, HOLD and KEEP meet content the relay has. */
const CONTENTS = 8;

function pageOf(rng: Rng): Page {
  return contentPage(rng.int(CONTENTS));
}

function contentPage(content: number): Page {
  return pageWith(new Uint8Array(PAGE_BYTES).fill(content));
}

function pageWith(page: Uint8Array): Page {
  const digest = new Uint8Array(DIGEST_BYTES);
  digestPage(page, digest);
  return { digest, page };
}


/** A well-formed relay request of some kind. */
function validRequest(rng: Rng): { type: number; payload: Uint8Array } {
  const run = runOf(rng.int(3));
  const pages = Array.from({ length: 1 + rng.int(3) }, () => pageOf(rng));
  const hex = Buffer.from(run).toString("hex");
  switch (rng.int(9)) {
    case 0:
    case 1:
      return { type: RelayFrame.PUT, payload: putPayload(run, rng.int(4), pages) };
    case 2:
      return { type: RelayFrame.HOLD, payload: encodeHoldOf(putPayload(run, rng.int(4), pages), KEEPER) };
    case 3:
      return { type: RelayFrame.KEEP, payload: encodeKeepOf(KEEPER, putPayload(run, 0, pages)) };
    case 4:
      return { type: rng.pick([RelayFrame.GET, RelayFrame.HAS]), payload: encodeDigestRequest(run, rng.int(100), joinDigests(pages)) };
    case 5:
      return { type: RelayFrame.RELEASE, payload: encodeRelease(run, joinDigests(pages)) };
    case 6:
      return { type: ProbeFrame.PROBE, payload: new Uint8Array([...probeHeader(rng.int(10)), ...rng.bytes(rng.int(64))]) };
    default: {
      const message = rng.pick([
        { t: "relay-stats?" as const, run: hex },
        { t: "relay-reserve" as const, run: hex, bytes: rng.int(1 << 20) },
        { t: "relay-unkeep" as const, run: "09".repeat(16) },
      ]);
      return { type: FrameType.CONTROL, payload: encodeControl(message) };
    }
  }
}

/** The digests of the PUT entries that fit in what was sent (mutated or not), to ask for afterwards. */
function putDigests(payload: Uint8Array, into: Set<string>): void {
  for (let at = 24; at + DIGEST_BYTES <= payload.length; at += DIGEST_BYTES + PAGE_BYTES) {
    into.add(Buffer.from(payload.subarray(at, at + DIGEST_BYTES)).toString("hex"));
  }
}

/** GETs every digest for each run; each page the relay has for it must hash to its digest. Returns how many it had. */
async function expectServedPagesMatch(port: number, runs: readonly Uint8Array[], digests: Set<string>): Promise<number> {
  const client = await rawSession(port, psk, "gather");
  const all = [...digests].map((hex) => Buffer.from(hex, "hex"));
  let found = 0;
  for (const run of runs) {
    for (let from = 0; from < all.length; from += 256) {
      const batch = all.slice(from, from + 256);
      const request = new Uint8Array(batch.length * DIGEST_BYTES);
      batch.forEach((d, i) => request.set(d, i * DIGEST_BYTES));
      const before = client.frames.length;
      client.writeFrame(RelayFrame.GET, encodeDigestRequest(run, from, request));
      await eventually(() => client.frames.length > before, 5000, "the relay answering a GET");
      const reply = client.frames.at(-1)!;
      expect(reply.type).toBe(RelayFrame.PAGES);
      const digest = new Uint8Array(DIGEST_BYTES);
      readPages(reply.payload, (digestAt, pageAt) => {
        if (pageAt < 0) return;
        found++;
        digestPage(reply.payload.subarray(pageAt, pageAt + PAGE_BYTES), digest);
        const named = reply.payload.subarray(digestAt, digestAt + DIGEST_BYTES);
        if (!Buffer.from(digest).equals(named)) throw new Error(`the relay served a page that fails its digest ${Buffer.from(named).toString("hex")}`);
      });
    }
  }
  client.close();
  return found;
}

/**
 * Before the fuzz, a clean peer puts pages of its own under WITNESS, which
 * the relay must take: afterwards they must be served intact. Whether any
 * fuzzed page is still held at the end is chance (later fuzzed frames
 * release them, or reserve the room), so the witness is what makes the
 * served-page check certain to look at real pages.
 */
async function putWitness(port: number): Promise<Set<string>> {
  const rng = new Rng(0x5747);
  const pages = Array.from({ length: 4 }, () => pageWith(rng.bytes(PAGE_BYTES)));
  const client = await rawSession(port, psk, "scatter");
  client.writeFrame(RelayFrame.PUT, putPayload(WITNESS, 1, pages));
  // acknowledged, so taken: a session closed with a PUT still being checked keeps nothing of it
  await eventually(() => client.frames.some((f) => f.type === RelayFrame.ACK), 5000, "the relay acknowledging the witness's PUT");
  expect(readAck(client.frames.find((f) => f.type === RelayFrame.ACK)!.payload).refused, "the witness's pages taken").toEqual([false, false, false, false]);
  client.close();
  return new Set(pages.map((p) => Buffer.from(p.digest).toString("hex")));
}

/** The relay answers a fresh peer's stats request promptly: its loop is not stuck. */
async function expectAnswers(port: number): Promise<void> {
  const client = await rawSession(port, psk, "scatter");
  client.writeFrame(FrameType.CONTROL, encodeControl({ t: "relay-stats?", run: "" }));
  await eventually(() => client.frames.length > 0, 5000, "a fresh peer's stats answered");
  client.close();
}

describe("fuzz", () => {
  let relay: Relay | undefined;
  let keepAlive: Timer | undefined;
  afterEach(async () => {
    clearInterval(keepAlive);
    await relay?.close();
    relay = undefined;
  });

  test.each([0, 2])("relay (%i digest threads): random and mutated frames from peers with the key", async (digestThreads) => {
    const capacityBytes = 1 << 20;
    const logs: string[] = [];
    relay = startRelay({ host: "127.0.0.1", port: 0, psk, capacityBytes, ttlMs: 60_000, digestThreads, log: (line) => logs.push(line) });
    const port = relay.port;
    const witness = await putWitness(port);
    // runs the fuzz orphans still expire in a long fuzz; the witness's outlives it, as a gather keeps its run while it waits
    const keeper = await rawSession(port, psk, "gather");
    keepAlive = setInterval(() => keeper.writeFrame(RelayFrame.RELEASE, encodeRelease(WITNESS, new Uint8Array(0))), 1000);
    const fuzzRuns = [0, 1, 2].map(runOf);
    const contents = new Set(Array.from({ length: CONTENTS }, (_, c) => contentPage(c)).map((p) => Buffer.from(p.digest).toString("hex")));
    let fuzzedServed = 0;
    const sent = new Set<string>();
    const sessions: RawSession[] = [];
    await fuzz(`relay on ${digestThreads} digest threads`, async (rng, n) => {
      const session = await rawSession(port, psk, rng.pick(["scatter", "gather"] as const));
      sessions.push(session);
      for (let f = 1 + rng.int(8); f > 0 && !session.isClosed; f--) {
        const valid = validRequest(rng);
        const roll = rng.next();
        if (roll < 0.3) {
          session.writeFrame(valid.type, valid.payload);
          if (valid.type === RelayFrame.PUT) putDigests(valid.payload, sent);
        } else if (roll < 0.8) {
          const payload = mutate(rng, valid.payload);
          // a page changed under its digest, the mutation that matters most
          if (valid.type === RelayFrame.PUT && payload.length > 24 + DIGEST_BYTES && rng.chance(0.5)) payload[payload.length - 1]! ^= 1;
          session.writeFrame(valid.type, payload);
          if (valid.type === RelayFrame.PUT) putDigests(payload, sent);
        } else if (roll < 0.9) {
          session.writeFrame(rng.int(40), rng.bytes(rng.int(300)));
        } else {
          // the header itself mutated: a wrong version, type or length
          const bytes = new Uint8Array(8 + valid.payload.length);
          bytes.set([1, valid.type, 0, 0], 0);
          new DataView(bytes.buffer).setUint32(4, valid.payload.length);
          bytes.set(valid.payload, 8);
          session.write(mutate(rng, bytes));
        }
      }
      // a peer left waiting for bytes a mutated length promised holds its socket: close some, keep the last few
      if (sessions.length > 8) sessions.shift()!.close();
      // the fuzz's few contents at many moments, not only what the end holds (its GETs answered show the loop not stuck too)
      if (n % 100 === 0) fuzzedServed += await expectServedPagesMatch(port, fuzzRuns, contents);
      else if (n % 20 === 0) await expectAnswers(port);
      const stats = relay!.stats();
      expect(stats.used).toBeLessThanOrEqual(capacityBytes);
      expect(stats.connections).toBeLessThanOrEqual(13);
    });
    clearInterval(keepAlive);
    keeper.close();
    for (const s of sessions) s.close();
    await eventually(() => relay!.stats().connections === 0, 5000, "every fuzzing peer's connection gone");
    await expectAnswers(port);
    fuzzedServed += await expectServedPagesMatch(port, fuzzRuns, sent);
    console.log(`relay on ${digestThreads} digest threads: ${fuzzedServed} fuzzed pages served, each matching its digest`);
    expect(await expectServedPagesMatch(port, [WITNESS], witness), "the witness's pages served, each matching its digest").toBe(witness.size);
    expect(logs.filter((line) => /internal|TypeError|RangeError/.test(line))).toEqual([]);
  }, 120_000);

  // ---- stream reader --------------------------------------------------------------

  let captured: Uint8Array | undefined;
  /** A short real stream and a complete small one the postcopy writer builds from it. */
  async function streams(): Promise<Uint8Array[]> {
    if (!captured) {
      const vm = await TestVm.start({ dir, name: "fuzz-capture", memMiB: 32, seed: 61 });
      await vm.waitFilled();
      captured = await captureStream(vm, dir);
      await vm.kill();
      rmSync(join(dir, "fuzz-capture.capture.sock"), { force: true });
    }
    const parts: { header?: Uint8Array; blocks?: Array<{ name: string; usedLength: number }>; device?: Uint8Array; pages: Array<[number, number, Uint8Array | null]> } = { pages: [] };
    const reader = new MigrationStreamReader({
      ...quiet,
      onHeader: (h) => (parts.header = h.slice()),
      onRamBlocks: (b) => (parts.blocks = [...b]),
      onPage: (block, page, data) => void (parts.pages.length < 64 && parts.pages.push([block, page, data?.slice() ?? null])),
      onDeviceState: (bytes) => (parts.device = bytes.slice()),
    });
    reader.feed(captured);
    reader.finish();
    const chunks: Uint8Array[] = [];
    const sink = { bytesWritten: 0, queuedBytes: 0, bytesAccepted: 0, write: (b: Uint8Array) => void chunks.push(b.slice()) };
    const writer = new PostcopyStreamWriter({ header: parts.header!, blocks: parts.blocks!, ramSectionId: 2, sink });
    writer.begin();
    for (const [block, page, data] of parts.pages.slice(0, 32)) writer.page(block, page, data);
    writer.discard(0, [[0, 1]]);
    writer.packageAndRun(parts.device!);
    for (const [block, page, data] of parts.pages.slice(32)) writer.page(block, page, data);
    writer.end();
    return [captured.subarray(0, 256 << 10), Buffer.concat(chunks)];
  }

  test("stream reader: mutated QEMU streams end in a data error or parse, never anything else", async () => {
    const corpus = await streams();
    const rssAtStart = process.memoryUsage().rss;
    const outcomes = { parsed: 0, refused: 0 };
    await fuzz("stream reader", (rng) => {
      const stream = mutate(rng, rng.pick(corpus));
      const reader = new MigrationStreamReader(quiet);
      try {
        for (let at = 0; at < stream.length; ) {
          const n = 1 + rng.int(rng.chance(0.2) ? 64 : 70_000);
          reader.feed(stream.subarray(at, at + n));
          at += n;
        }
        reader.finish();
        outcomes.parsed++;
      } catch (err) {
        if (!(err instanceof SgmError)) throw new Error(`the reader threw ${(err as Error).name}: ${(err as Error).message}`);
        outcomes.refused++;
      }
      if (process.memoryUsage().rss > rssAtStart + (512 << 20)) throw new Error("the reader's memory grew past 512 MiB");
    });
    console.log(`stream reader: ${outcomes.parsed} parsed to the end, ${outcomes.refused} refused`);
    expect(outcomes.parsed).toBeGreaterThan(0);
    expect(outcomes.refused).toBeGreaterThan(0);
  }, 180_000);

  // ---- gather ---------------------------------------------------------------------

  /** A gather, its model destination, and a raw scatter session to it; close() stops the gather and the destination. */
  async function gatherRound(name: string, script: SourceScript, digestThreads: number) {
    const destination = new ModelDestinationQemu(dir, name, { blocks: script.blocks });
    const stop = new AbortController();
    const logs: string[] = [];
    const close = (): void => {
      stop.abort();
      destination.close();
    };
    try {
      const listening = Promise.withResolvers<number>();
      const gathering = runGather({
        listen: { host: "127.0.0.1", port: 0 },
        vms: [{ name: "fz", qmp: destination.qmpPath }],
        psk,
        stateDir: null,
        digestThreads,
        signal: stop.signal,
        log: (line) => logs.push(line),
        onListening: (port) => listening.resolve(port),
      });
      const ended = gathering.then(
        (report) => (report.ok ? "completed" : "failed"),
        (err: unknown) => {
          if (!(err instanceof SgmError)) throw new Error(`the gather threw ${(err as Error).name}: ${(err as Error).message}`);
          return "failed";
        },
      );
      const session = await rawSession(await listening.promise, psk, "scatter", 64 << 20);
      // as a scatter does, it goes once told its VM's end: a gather that is done waits for its scatter to close
      const told = () => session.frames.some((f) => f.type === FrameType.CONTROL && ["failed", "refuse", "completed"].includes(decodeControl(f.payload).t));
      return { destination, stop, logs, ended, session, told, close };
    } catch (err) {
      close();
      throw err;
    }
  }

  /** The destination's content ids, page by page, once no page there has bytes that no content makes. */
  function expectNoForeignPage(destination: ModelDestinationQemu): Int32Array {
    const held = destination.contentIds();
    const bad = [...held].flatMap((id, page) => (id === -1 ? [page] : []));
    if (bad.length > 0) throw new Error(`pages ${bad.slice(0, 8).join(", ")} reached the destination with bytes no content makes`);
    return held;
  }

  test.each([0, 2])("gather (%i digest threads): a scatter's session replayed with frames mutated, dropped and repeated: no crash, no hang, no page unlike its digest reaches QEMU", async (digestThreads) => {
    // a small VM: a quarter zero pages, the rest from 50 contents
    const script: SourceScript = { blocks: [{ name: "pc.ram", pages: 256 }], initial: (i) => (i % 4 === 3 ? 0 : 1 + (i % 50)), writes: () => [], passes: 1 };
    const recorded = await recordScatterFrames("fz", script);
    expect(recorded.length).toBeGreaterThan(3);
    console.log(`gather: a session of ${recorded.length} frames recorded`);

    // First a witness whose outcome is certain, as no fuzzed round's is: the session intact but for one byte of
    // one page under its digest. The gather must fail the VM, with no such page at the destination.
    const witness = await gatherRound(`fz${digestThreads}w-in`, script, digestThreads);
    try {
      const changed = recorded.findIndex((f) => f.type === FrameType.PAGE_DATA);
      expect(changed).toBeGreaterThanOrEqual(0);
      for (const [i, f] of recorded.entries()) {
        const payload = i === changed ? f.payload.slice() : f.payload;
        if (i === changed) payload[payload.length - 1]! ^= 1;
        witness.session.writeFrame(f.type, payload);
      }
      await eventually(() => witness.told() || witness.session.isClosed, 30_000, "the gather telling the scatter its VM's end after a page changed under its digest");
      witness.session.close();
      expect(await within(witness.ended, 10_000, "the gather ending once its scatter went")).toBe("failed");
      expectNoForeignPage(witness.destination);
    } finally {
      witness.close();
    }

    const outcomes = { completed: 0, failed: 0, waiting: 0 };
    await fuzz(`gather on ${digestThreads} digest threads`, async (rng, n) => {
      const { destination, stop, logs, ended, session, told, close } = await gatherRound(`fz${digestThreads}t${n}-in`, script, digestThreads);
      try {
        // some rounds change one frame in a hundred, some one in ten: a session mostly intact reaches further in
        const rate = rng.pick([0.005, 0.02, 0.1]);
        for (const f of recorded) {
          const roll = rng.next() / rate;
          if (roll < 0.2) continue;
          const payload = roll < 1 ? mutate(rng, f.payload) : f.payload;
          session.writeFrame(roll < 0.25 ? rng.int(40) : f.type, payload);
          if (roll < 0.3) session.writeFrame(f.type, payload);
        }
        // the scatter's side as it was, answering nothing: the gather ends on its own, or when the scatter goes
        // the gather ends, or takes the VM (its destination asked to listen), or waits for a scatter: up to 2 s to see which
        let first: string | null = null;
        void ended.then((outcome) => (first = outcome));
        const until = performance.now() + 2000;
        while (first === null && destination.migrationStatus === "none" && !session.isClosed && !told() && performance.now() < until) await Bun.sleep(10);
        session.close();
        let outcome = first as string | null;
        if (outcome === null && destination.migrationStatus === "none") {
          // no VM was offered it: a gather waits for a scatter to come, and ends when told to
          stop.abort();
          outcome = await Promise.race([ended, Bun.sleep(5000).then(() => "hung")]);
          if (outcome === "hung") throw new Error(`the gather, waiting for a scatter, did not end within 5 s of its abort; it said:\n${logs.slice(-12).join("\n")}`);
          outcome = "waiting";
        }
        outcome ??= await Promise.race([ended, Bun.sleep(10_000).then(() => "hung")]);
        if (outcome === "hung") throw new Error(`the gather did not end within 10 s of its scatter going; it said:\n${logs.slice(-12).join("\n")}`);
        outcomes[outcome as keyof typeof outcomes]++;
        const held = expectNoForeignPage(destination);
        if (outcome === "completed") {
          // what the gather calls done must be the source's memory, page for page, whatever was mutated on the way
          const wrong = [...held].flatMap((id, page) => (id === script.initial(page) ? [] : [page]));
          if (wrong.length > 0) throw new Error(`the gather completed, but pages ${wrong.slice(0, 8).join(", ")} are not the source's`);
        }
      } finally {
        close();
      }
    });
    console.log(`gather on ${digestThreads} digest threads: ${outcomes.completed} completed, ${outcomes.failed} failed, ${outcomes.waiting} never offered a VM`);
  }, 180_000);

  // ---- QMP client -----------------------------------------------------------------

  test("QMP client: random greetings and replies end in an answer or an error, in bounded time", async () => {
    const path = join(dir, "fuzz-qmp.sock");
    const greeting = JSON.stringify({ QMP: { version: { qemu: { micro: 0, minor: 0, major: 10 }, package: "" }, capabilities: [] } });
    let rng = new Rng(0);
    const reply = (line: string): string => {
      let id: unknown = null;
      try {
        id = (JSON.parse(line) as { id?: unknown }).id;
      } catch {}
      const answers = [
        () => JSON.stringify({ return: {}, id }),
        () => JSON.stringify({ return: { status: "running" }, id }),
        () => JSON.stringify({ error: { class: "GenericError", desc: "no" }, id }),
        () => JSON.stringify({ error: rng.pick([null, 5, "x", [], { class: 7, desc: null }]), id }),
        () => JSON.stringify({ return: {}, id: rng.pick([id, "1", null, -1, 1e9]) }),
        () => rng.pick(["null", "5", '"text"', "[1,2]", "{}", "{", "garbage"]),
        () => JSON.stringify({ event: rng.pick(["STOP", "MIGRATION", 5]), data: rng.pick([null, 5, "x", { status: 3 }]), timestamp: rng.pick([null, 1]) }),
        () => "",
        () => new TextDecoder().decode(mutate(rng, new TextEncoder().encode(JSON.stringify({ return: {}, id })))),
      ];
      return `${rng.pick(answers)()}\n`;
    };
    type Peer = { write(data: string | Uint8Array): number; end(): void };
    const behave = (socket: Peer, line: string) => {
      const roll = rng.next();
      if (roll < 0.03) socket.end();
      else if (roll < 0.05) socket.write(new Uint8Array(MAX_QMP_LINE + 4096).fill(0x61));
      else if (roll < 0.1) return; // no answer: the command times out
      else for (let k = rng.int(3) + (roll < 0.8 ? 1 : 0); k > 0; k--) socket.write(reply(line));
    };
    const server = Bun.listen<{ text: string }>({
      unix: path,
      socket: {
        open(socket) {
          socket.data = { text: "" };
          const roll = rng.next();
          if (roll < 0.1) socket.write(`${new TextDecoder().decode(mutate(rng, new TextEncoder().encode(greeting)))}\n`);
          else if (roll < 0.12) socket.write(rng.pick(["null\n", "{}\n", '{"QMP":{"version":{"qemu":{"major":"x"}}}}\n']));
          else if (roll < 0.13) socket.end();
          else socket.write(`${greeting}\n`);
        },
        data(socket, chunk) {
          socket.data.text += new TextDecoder().decode(chunk);
          let nl: number;
          while ((nl = socket.data.text.indexOf("\n")) >= 0) {
            const line = socket.data.text.slice(0, nl);
            socket.data.text = socket.data.text.slice(nl + 1);
            behave(socket, line);
          }
        },
      },
    });
    try {
      const outcomes = { answered: 0, refused: 0 };
      await fuzz("QMP client", async (r) => {
        rng = r;
        const started = performance.now();
        const settle = async (promise: Promise<unknown>) => {
          try {
            await promise;
            outcomes.answered++;
          } catch (err) {
            if (!(err instanceof SgmError)) throw new Error(`the QMP client threw ${(err as Error).name}: ${(err as Error).message}`);
            outcomes.refused++;
          }
        };
        let client: QmpClient | null = null;
        await settle(QmpClient.connect({ kind: "unix", path }, { timeoutMs: 300 }).then((c) => (client = c)));
        if (client) {
          const c = client as QmpClient;
          const commands = Array.from({ length: 1 + rng.int(3) }, () => settle(c.execute("query-status", undefined, { timeoutMs: 300 })));
          await Promise.all([...commands, settle(c.waitForEvent("STOP", undefined, 100))]);
          c.close();
          await c.closed;
        }
        if (performance.now() - started > 3000) throw new Error(`a round took ${Math.round(performance.now() - started)} ms: something waited past its timeout`);
      });
      expect(outcomes.answered).toBeGreaterThan(0);
      expect(outcomes.refused).toBeGreaterThan(0);
    } finally {
      server.stop(true);
    }
  }, 120_000);
});

const quiet: ReaderHandler = {
  onHeader: () => {},
  onRamBlocks: () => {},
  onPage: () => {},
  onRamSectionEnd: () => {},
  onCommand: () => {},
  onPackaged: () => {},
  onDeviceState: () => {},
  onEof: () => {},
};
