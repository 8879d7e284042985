// How fast a relay takes and gives pages on loopback, against a plain TCP
// stream of the same bytes. Run: bun test/benchmarks/relay.bench.ts [MiB, default 512]
// (a script, not a test). A second argument gives the relay digest threads
// (default 0: it checks PUT pages on its one thread).
//
// The relay is the compiled dist/sgm in its own process and the plain
// stream's receiver is this script in another, so each side has its own
// event loop as in real use. The clients put and get as sgm's roles do: a
// scatter's PUT frames with as many in flight as it lets a relay have, a
// gather's background GETs, as many digests and as many in flight as its
// fetcher asks. The PUT row includes the relay's digest check
// of every page; neither row hashes on the client side (digests are
// computed before the clock starts), so they measure the relay and the wire.
// Each row runs a few rounds; the best and the median are printed, since a
// loaded two-core machine swung single runs by 2x.
//
// A third argument `tls` puts the relay and both clients on TLS (under the
// key, as --tls-cert/--tls-key/--tls-ca do), for its cost against the same
// rows without.
//
// The relay's CPU and page faults are also read off /proc for each round:
// its first round fills memory its process never touched, which costs more
// than the pages themselves, and the rounds after it are what a relay that
// has served a while spends. Each PUT and GET round also prints what the
// client (this process) and the relay spent on it against how long it took:
// an end whose thread was busy for as long as the round is what bounds it.
//
// With SGM_PROFILE_DIR set, the relay runs from source under Bun's CPU
// profiler and leaves its profile (markdown) in that directory.

import { cpus } from "node:os";
import { RUNTIME_SETTINGS } from "../../cli/runtime-settings.ts";
import { DIGEST_BYTES, PAGE_BYTES, digestPage } from "../../core/dedup/digest.ts";
import { PeerConnection } from "../../core/wire/connection.ts";
import { decodeControl, encodeControl } from "../../core/wire/control.ts";
import { FrameType, maxPayload } from "../../core/wire/messages.ts";
import { FETCH_BATCH, FETCH_WINDOW } from "../../core/gather/relay-fetcher.ts";
import { MAX_IN_FLIGHT } from "../../core/scatter/relay-link.ts";
import {
  PUT_BATCH,
  PutBuilder,
  RELEASE_BATCH,
  RelayFrame,
  encodeDigestRequest,
  encodeRelease,
  readAck,
  readPages,
} from "../../core/wire/relay-messages.ts";
import { makeTestCertificates } from "../harness/certificates.ts";
import { processCounters, type ProcessCounters } from "../harness/process-counters.ts";
import { sgmBinary } from "../harness/sgm.ts";
import { runSink } from "../harness/socket-sink.ts";
import { makeTempDir, removeDir } from "../harness/tmp.ts";

const HOST = "127.0.0.1";
const PUT_WINDOW = MAX_IN_FLIGHT; // PUT frames awaiting their ACK, as a scatter lets them
const GET_WINDOW = FETCH_WINDOW; // GET requests awaiting their PAGES, as a gather's fetcher asks them
const GET_BATCH = FETCH_BATCH;
const ROUNDS = 3;

if (process.argv[2] === "--sink") runSink(Number(process.argv[3]));
else await main(Number(process.argv[2] ?? 512), Number(process.argv[3] ?? 0), process.argv[4] === "tls");


interface RelayCost {
  cpuUserSeconds: number;
  cpuSystemSeconds: number;
  mainThreadCpuSeconds: number | null;
  minorPageFaults: number;
  peakRssBytes: number;
}

/** What one PUT or GET round cost: CPU seconds of this process (the client) and of the relay. */
interface Spent {
  client: number;
  relay: number;
  relayMain: number;
}

/** Runs a relay row's round (it returns its milliseconds), and records them and what the client and the relay spent on it. */
async function runRound(row: RelayRow, relayPid: number, round: () => Promise<number>): Promise<void> {
  const relayBefore = await processCounters(relayPid);
  const clientBefore = process.cpuUsage();
  row.ms.push(await round());
  const client = process.cpuUsage(clientBefore);
  const relayAfter = await processCounters(relayPid);
  row.spent.push({
    client: (client.user + client.system) / 1e6,
    relay: relayAfter.cpuUserSeconds + relayAfter.cpuSystemSeconds - relayBefore.cpuUserSeconds - relayBefore.cpuSystemSeconds,
    relayMain: relayAfter.mainThreadCpuSeconds! - relayBefore.mainThreadCpuSeconds!,
  });
}

interface Row {
  path: string;
  /** Milliseconds of each round. */
  ms: number[];
}

interface RelayRow extends Row {
  /** What each round cost. */
  spent: Spent[];
}

async function main(mib: number, digestThreads: number, withTls: boolean): Promise<void> {
  const pages = (mib << 20) / PAGE_BYTES;
  if (!Number.isInteger(pages / GET_BATCH)) throw new Error(`${mib} MiB is not a whole number of ${GET_BATCH}-page requests`);
  const data = new Uint8Array(pages * PAGE_BYTES);
  for (let o = 0; o < data.length; o += 65536) crypto.getRandomValues(data.subarray(o, o + 65536));
  const digests = new Uint8Array(pages * DIGEST_BYTES);
  for (let i = 0; i < pages; i++) digestPage(page(data, i), digests, i * DIGEST_BYTES);

  const dir = makeTempDir("bench-relay");
  const tcp: Row = { path: "plain TCP stream (no framing)", ms: [] };
  const put: RelayRow = { path: `relay PUT, ${PUT_BATCH}-page frames, window ${PUT_WINDOW}`, ms: [], spent: [] };
  const get: RelayRow = { path: `relay GET, ${GET_BATCH}-digest requests, window ${GET_WINDOW}`, ms: [], spent: [] };
  const children: Bun.Subprocess[] = [];
  const rounds: Array<{ cpuSeconds: number; faults: number }> = [];
  let cost: (RelayCost & { moved: number }) | undefined;
  try {
    const sinkProc = Bun.spawn([process.execPath, import.meta.path, "--sink", String(data.length)], { stdout: "pipe", stderr: "inherit" });
    children.push(sinkProc);
    const sinkPort = Number(new TextDecoder().decode((await sinkProc.stdout.getReader().read()).value).trim());
    for (let round = 0; round < ROUNDS; round++) tcp.ms.push(await plainTcp(sinkPort, data));

    const certs = withTls ? await makeTestCertificates(dir) : null;
    const tlsFlags = certs ? ["--tls-cert", certs.peer("a").cert, "--tls-key", certs.peer("a").key, "--tls-ca", certs.ca] : [];
    const tls = certs
      ? { cert: await Bun.file(certs.peer("b").cert).text(), key: await Bun.file(certs.peer("b").key).text(), ca: await Bun.file(certs.ca).text() }
      : null;
    const pskFile = `${dir}/psk`;
    await Bun.write(pskFile, "sgm relay bench key 0123456789abcdef\n");
    const psk = new TextEncoder().encode("sgm relay bench key 0123456789abcdef");
    const relay = Bun.spawn(
      [...(await relayCommand()), "relay", "--listen", `${HOST}:0`, "--capacity", `${mib + 64}MiB`, "--psk-file", pskFile, "--ready-fd", "3", "--json", "--digest-threads", String(digestThreads), ...tlsFlags],
      // the runtime's settings given, sgm does not run itself again (cli/runtime-settings.ts): this process is the relay, for /proc
      { stdio: ["ignore", "pipe", "ignore", "pipe"], env: { ...process.env, ...RUNTIME_SETTINGS } },
    );
    children.push(relay);
    const ready = await Bun.file(relay.stdio[3] as number).text();
    const port = Number(/:(\d+)\n$/.exec(ready)?.[1]);
    const connect = (role: "scatter" | "gather") => PeerConnection.connect({ host: HOST, port, psk, tls, role, maxPayload, timeoutMs: 5000 });
    const scatter = await connect("scatter");
    const gather = await connect("gather");
    // Each round puts the pages under a new run and releases them after the
    // GET, so every PUT round stores all of them again (in the slabs the
    // first round allocated, as a relay that has run a while would).
    for (let round = 0; round < ROUNDS; round++) {
      const before = await processCounters(relay.pid);
      const run = crypto.getRandomValues(new Uint8Array(16));
      await runRound(put, relay.pid, () => putAll(scatter, run, data, digests));
      await runRound(get, relay.pid, () => getAll(gather, run, digests));
      const held = (await relayStats(gather)).pages;
      if (held !== pages) throw new Error(`relay holds ${held} pages, not ${pages}`);
      for (let from = 0; from < digests.length; from += RELEASE_BATCH * DIGEST_BYTES) {
        gather.send(RelayFrame.RELEASE, encodeRelease(run, digests.subarray(from, from + RELEASE_BATCH * DIGEST_BYTES)));
      }
      const left = (await relayStats(gather)).pages;
      if (left !== 0) throw new Error(`relay still holds ${left} pages after the release`);
      const after = await processCounters(relay.pid);
      const cpu = (x: ProcessCounters) => x.cpuUserSeconds + x.cpuSystemSeconds;
      rounds.push({ cpuSeconds: cpu(after) - cpu(before), faults: after.minorPageFaults - before.minorPageFaults });
    }
    scatter.close();
    gather.close();
    // SIGTERM drains: every run is released, so the relay exits with its report
    relay.kill("SIGTERM");
    const out = JSON.parse(await new Response(relay.stdout).text()) as { bytesIn: number; process: RelayCost };
    cost = { ...out.process, moved: out.bytesIn };
  } finally {
    for (const child of children) child.kill("SIGTERM");
    await Promise.all(children.map((child) => child.exited));
    removeDir(dir);
  }

  const mbps = (ms: number) => (data.length / 1e6 / (ms / 1000)).toFixed(0);
  console.log(`${mib} MiB of random pages on loopback, ${ROUNDS} rounds, ${cpus().length} CPUs, relay on ${digestThreads} digest threads${withTls ? ", relay rows over TLS" : ""} (MB/s: 10^6 bytes per second)\n`);
  console.log(`${"path".padEnd(44)} ${"best s".padStart(7)} ${"best MB/s".padStart(10)} ${"median MB/s".padStart(12)}`);
  const medianMs = (row: Row) => [...row.ms].sort((x, y) => x - y)[Math.floor(row.ms.length / 2)]!;
  for (const row of [tcp, put, get]) {
    const best = Math.min(...row.ms);
    console.log(`${row.path.padEnd(44)} ${(best / 1000).toFixed(2).padStart(7)} ${mbps(best).padStart(10)} ${mbps(medianMs(row)).padStart(12)}`);
  }
  // rates are inverse to times: a row's share of plain TCP's rate is TCP's time over its own
  const share = (row: Row) => (medianMs(tcp) / medianMs(row)).toFixed(2);
  console.log(`\nmedians against plain TCP (issue 11's goals): PUT ${share(put)} (at least 0.6), GET ${share(get)} (at least 0.8)`);
  if (cost) {
    const per = (x: number) => (x / (cost.moved / 2 ** 30)).toFixed(2);
    console.log(
      `\nrelay process, per GiB taken in and given out again: CPU ${per(cost.cpuUserSeconds)} user + ${per(cost.cpuSystemSeconds)} system s` +
        ` (main thread ${cost.mainThreadCpuSeconds === null ? "?" : per(cost.mainThreadCpuSeconds)}), ${per(cost.minorPageFaults)} page faults; peak RSS ${(cost.peakRssBytes / 2 ** 20).toFixed(0)} MiB (issue 11: at most 0.4 CPU s)`,
    );
  }
  const gib = data.length / 2 ** 30;
  // which end bounds a row: a thread as busy as the round was long
  for (const row of [put, get]) {
    const line = row.spent.map((x, i) => {
      const wall = row.ms[i]! / 1000;
      return `round ${i + 1} ${(wall / gib).toFixed(2)} s, client ${(x.client / gib).toFixed(2)}, relay ${(x.relay / gib).toFixed(2)} (main thread ${(x.relayMain / gib).toFixed(2)})`;
    });
    console.log(`${row === put ? "PUT" : "GET"}, per GiB: ${line.join("; ")}`);
  }
  console.log(
    `each round, per GiB taken in and given out again: ${rounds.map((r, i) => `round ${i + 1} ${(r.cpuSeconds / gib).toFixed(2)} CPU s, ${Math.round(r.faults / gib)} page faults`).join("; ")} (round 1 fills the relay's fresh memory)`,
  );
}

/** The compiled sgm, or with SGM_PROFILE_DIR the source under Bun's CPU profiler. */
async function relayCommand(): Promise<string[]> {
  const dir = process.env.SGM_PROFILE_DIR;
  if (!dir) return [await sgmBinary()];
  // set as sgm sets them for itself (cli/runtime-settings.ts), so that the profiled process is the relay, not a parent re-running it
  return ["env", ...Object.entries(RUNTIME_SETTINGS).map(([name, value]) => `${name}=${value}`), process.execPath, "--cpu-prof-md", `--cpu-prof-dir=${dir}`, new URL("../../cli/main.ts", import.meta.url).pathname];
}

function page(data: Uint8Array, i: number): Uint8Array {
  return data.subarray(i * PAGE_BYTES, (i + 1) * PAGE_BYTES);
}

/** Milliseconds to stream `data` to the sink process, until it says it has all of it. */
async function plainTcp(port: number, data: Uint8Array): Promise<number> {
  const chunk = 1 << 20;
  let offset = 0;
  let start = 0;
  const done = Promise.withResolvers<number>();
  const pump = (socket: { write(b: Uint8Array): number }): void => {
    while (offset < data.length) {
      const part = data.subarray(offset, Math.min(offset + chunk, data.length));
      const written = socket.write(part);
      offset += Math.max(written, 0);
      if (written < part.length) return; // the rest on drain
    }
  };
  const socket = await Bun.connect({
    hostname: HOST,
    port,
    socket: {
      open(s) {
        start = performance.now();
        pump(s);
      },
      drain: pump,
      data: () => done.resolve(performance.now() - start),
    },
  });
  const ms = await done.promise;
  socket.end();
  return ms;
}

/** Milliseconds to PUT every page and have every ACK back. */
async function putAll(conn: PeerConnection, run: Uint8Array, data: Uint8Array, digests: Uint8Array): Promise<number> {
  const batches = data.length / PAGE_BYTES / PUT_BATCH;
  // A buffer is free again once its frame's ACK is back, so the window's worth is enough.
  const ring = Array.from({ length: PUT_WINDOW }, () => new Uint8Array(PutBuilder.BUFFER_BYTES));
  let acked = 0;
  let refused = 0;
  let wake: (() => void) | undefined;
  conn.onFrame((type, payload) => {
    if (type !== RelayFrame.ACK) return;
    refused += readAck(payload).refused.filter(Boolean).length;
    acked++;
    wake?.();
  });
  const waitFor = (condition: () => boolean) => waitUntil(condition, (w) => (wake = w));
  const start = performance.now();
  for (let seq = 0; seq < batches; seq++) {
    await waitFor(() => seq - acked < PUT_WINDOW);
    const builder = new PutBuilder(ring[seq % PUT_WINDOW]);
    for (let n = 0; n < PUT_BATCH; n++) {
      const i = seq * PUT_BATCH + n;
      builder.add(digests, i * DIGEST_BYTES, page(data, i));
    }
    conn.send(RelayFrame.PUT, builder.take(run, seq, new Uint8Array(0)).payload);
  }
  await waitFor(() => acked === batches);
  const ms = performance.now() - start;
  if (refused > 0) throw new Error(`relay refused ${refused} pages`);
  return ms;
}

/** Milliseconds to GET every page back. */
async function getAll(conn: PeerConnection, run: Uint8Array, digests: Uint8Array): Promise<number> {
  const requests = digests.length / DIGEST_BYTES / GET_BATCH;
  let replies = 0;
  let missing = 0;
  let wake: (() => void) | undefined;
  conn.onFrame((type, payload) => {
    if (type !== RelayFrame.PAGES) return;
    readPages(payload, (_digestAt, pageAt) => {
      if (pageAt < 0) missing++;
    });
    replies++;
    wake?.();
  });
  const waitFor = (condition: () => boolean) => waitUntil(condition, (w) => (wake = w));
  const start = performance.now();
  for (let req = 0; req < requests; req++) {
    await waitFor(() => req - replies < GET_WINDOW);
    const from = req * GET_BATCH * DIGEST_BYTES;
    conn.send(RelayFrame.GET, encodeDigestRequest(run, req, digests.subarray(from, from + GET_BATCH * DIGEST_BYTES)));
  }
  await waitFor(() => replies === requests);
  const ms = performance.now() - start;
  if (missing > 0) throw new Error(`relay did not find ${missing} pages`);
  return ms;
}

/** Resolves once `condition` holds, checking it again each time the frame handler calls the waker. */
async function waitUntil(condition: () => boolean, setWaker: (wake: () => void) => void): Promise<void> {
  while (!condition()) await new Promise<void>((resolve) => setWaker(resolve));
}

async function relayStats(conn: PeerConnection): Promise<{ pages: number }> {
  const reply = Promise.withResolvers<{ pages: number }>();
  conn.onFrame((type, payload) => {
    if (type !== FrameType.CONTROL) return;
    const message = decodeControl(payload);
    if (message.t === "relay-stats") reply.resolve(message);
  });
  conn.send(FrameType.CONTROL, encodeControl({ t: "relay-stats?", run: "" }));
  return reply.promise;
}
