// Benchmark (not a test): what moving a guest costs each sgm role, in CPU
// seconds per GiB (the process's own accounting, in its --json report) and
// peak resident memory, beside QEMU's own migration of the same guest and a
// plain Bun socket on this machine, all in one run. CPU per GiB holds from
// machine to machine; wall times only as ratios to the baselines.
//
//   bun test/benchmarks/cost.bench.ts [MiB, default 1024] [runs, default 3] [prealloc]
//
// The guest is the test guest with its churn region (shared, zero and
// unique content), idle otherwise. "sgm direct" moves it scatter -> gather,
// hashing on each role's one thread, then on two digest threads beside it in
// the scatter and two in the gather;
// "sgm via relays" holds the gather to 256 MiB/s so that two relays take
// most pages. GiB are of the source's stream, which every role carries once;
// a relay's, of what it took in (and gave out again).
//
// The two relays run through every run, as relay daemons serve one
// eviction after another: a relay's first run fills memory its process
// never touched before, which costs it more than the pages themselves (page
// faults of fresh memory), so the table's relay rows are the runs after it,
// and the first run is printed apart. With `prealloc` the relays start with
// --prealloc, their 4 GiB capacity resident before the first run. A relay's cost per run is read off
// its process in /proc (CPU, faults, and the peak RSS, started again for
// each run; it runs with the runtime's settings of cli/runtime-settings.ts given,
// so it is not a re-executed child), its bytes off its own counters
// (relay-stats), once those stop moving after the run.
// "sgm direct" runs once more per run on a guest a quarter the size (128
// MiB at least): the line through the two sizes splits each role's CPU into
// what every GiB of the stream adds and what its process costs whatever it
// moves (starting Bun, compiling the code, memory touched the first time).
// It ends with issue 11's goals beside this run's figures and the floor
// under them: what Bun's sockets (both ends, measured here) and the digest of
// every page cost a role that receives, hashes and sends each byte; and
// the same floor with the stream received by read(2) into one buffer, as
// a native receive path would. The roles do that for what waits after each
// of Bun's reads (core/net/socket-receive.ts); the table says how much, per
// GiB of the stream, from each role's report, and how much each wrote from
// its own sender threads (core/net/socket-send.ts).
// Last, what the whole machine and each QEMU spent during QEMU's own
// migration and during sgm direct: on a machine of few cores the four
// processes of an sgm migration take turns on them, so the total time
// against QEMU's is bounded by their CPU seconds, and the benchmark prints
// that bound for roles that cost no more than the floor.

import { RUNTIME_SETTINGS } from "../../cli/runtime-settings.ts";
import { DIGEST_BYTES, PAGE_BYTES, batchDigestNative, digestPage, digestPages } from "../../core/dedup/digest.ts";
import { digestLanes } from "../../core/dedup/native-digest.ts";
import type { GatherReport } from "../../core/gather/engine.ts";
import type { ScatterReport } from "../../core/scatter/engine.ts";
import { loadPsk } from "../../core/wire/auth.ts";
import { PeerConnection } from "../../core/wire/connection.ts";
import { decodeControl, encodeControl } from "../../core/wire/control.ts";
import { FrameType, maxPayload } from "../../core/wire/messages.ts";
import { report, startGather, startPair, startRelay, startScatter, writePsk } from "../harness/cluster.ts";
import { migrateDirect } from "../harness/direct.ts";
import { killAll } from "../harness/processes.ts";
import type { SgmProcess } from "../harness/sgm.ts";
import { accounted, median, printMachineAccounts, type MachineAccount } from "../harness/machine-account.ts";
import { processCounters, type ProcessCounters } from "../harness/process-counters.ts";
import { runSink, type SinkReply } from "../harness/socket-sink.ts";
import { makeTempDir, removeDir } from "../harness/tmp.ts";

interface Resources extends ProcessCounters {
  /** From a role's own report; a relay's counters come from /proc, which cannot tell. */
  bytesReceivedNatively?: number;
  bytesSentNatively?: number;
  pagesHashedByHelpers?: number;
}

const GiB = 2 ** 30;

if (process.argv[2] === "--sink") runSink(Number(process.argv[3]), process.argv[4] === "native");
else await main(Number(process.argv[2] ?? 1024), Number(process.argv[3] ?? 3), process.argv[4] === "prealloc");


interface SocketRun {
  /** Bytes per second. */
  rate: number;
  /** CPU seconds per GiB, user plus system, of each end. */
  sendCpu: number;
  receiveCpu: number;
}

/** A plain TCP stream over loopback from this process's Bun socket to a sink's: Bun's own, or read(2) into one buffer. */
async function rawSocket(bytes: number, sink: "bun" | "native"): Promise<SocketRun> {
  const child = Bun.spawn([process.execPath, import.meta.path, "--sink", String(bytes), sink], { stdout: "pipe" });
  const reader = child.stdout.getReader();
  const { value } = await reader.read();
  const port = Number(new TextDecoder().decode(value).trim());
  const chunk = new Uint8Array(256 * 1024).fill(7);
  const done = Promise.withResolvers<SinkReply>();
  let reply = "";
  let sent = 0;
  const pump = (socket: { write(b: Uint8Array): number }) => {
    while (sent < bytes) {
      const n = socket.write(chunk.subarray(0, Math.min(chunk.length, bytes - sent)));
      sent += Math.max(n, 0);
      if (n < chunk.length) return;
    }
  };
  const started = performance.now();
  const cpu = process.cpuUsage();
  await Bun.connect({
    hostname: "127.0.0.1",
    port,
    socket: {
      open: pump,
      drain: pump,
      data: (_s, d) => {
        reply += new TextDecoder().decode(d);
        if (reply.endsWith("\n")) done.resolve(JSON.parse(reply) as SinkReply);
      },
    },
  });
  const answer = await done.promise;
  const seconds = (performance.now() - started) / 1000;
  const spent = process.cpuUsage(cpu);
  child.kill();
  const gib = bytes / GiB;
  return {
    rate: bytes / seconds,
    sendCpu: (spent.user + spent.system) / 1e6 / gib,
    receiveCpu: (answer.cpuUserSeconds + answer.cpuSystemSeconds) / gib,
  };
}

/**
 * CPU seconds per GiB that the digest (BLAKE3) of every 4 KiB page costs on this thread
 * (best of 5 over 64 MiB of random pages): a page a call, or, as the roles
 * hash, 128 pages a call (natively, where the CPU allows).
 */
function digestPerGiB(batched: boolean): number {
  const data = new Uint8Array(64 * 2 ** 20);
  for (let o = 0; o < data.length; o += 65536) crypto.getRandomValues(data.subarray(o, o + 65536));
  const out = new Uint8Array(128 * DIGEST_BYTES);
  let best = Infinity;
  for (let round = 0; round < 6; round++) {
    const cpu = process.cpuUsage();
    if (batched) for (let at = 0; at < data.length; at += 128 * PAGE_BYTES) digestPages(data.subarray(at), PAGE_BYTES, 128, out);
    else for (let at = 0; at < data.length; at += PAGE_BYTES) digestPage(data.subarray(at, at + PAGE_BYTES), out);
    const spent = process.cpuUsage(cpu);
    if (round > 0) best = Math.min(best, (spent.user + spent.system) / 1e6);
  }
  return best / (data.length / GiB);
}

interface SgmRun {
  totalMs: number;
  evictionMs: number;
  streamBytes: number;
  roles: Map<string, Resources & { bytes: number }>;
  machine: MachineAccount;
}

/** A relay serving every run of the bench, as a relay daemon serves evictions. */
interface LongRelay {
  relay: SgmProcess;
  address: string;
  port: number;
}

async function startRelays(psk: string, count: number, prealloc: boolean): Promise<LongRelay[]> {
  return Promise.all(
    Array.from({ length: count }, async () => {
      // the runtime's settings given, sgm does not run itself again: this process is the relay
      const { relay, address } = await startRelay(psk, "4GiB", ["--json", ...(prealloc ? ["--prealloc"] : [])], RUNTIME_SETTINGS);
      return { relay, address, port: Number(address.slice(address.lastIndexOf(":") + 1)) };
    }),
  );
}

interface RelayStats {
  bytesIn: number;
  bytesOut: number;
  used: number;
  runs: number;
}

/** A relay's own counters, from its relay-stats reply. */
async function relayStats(relay: LongRelay, psk: Uint8Array): Promise<RelayStats> {
  const conn = await PeerConnection.connect({ host: "127.0.0.1", port: relay.port, psk, tls: null, role: "gather", maxPayload, timeoutMs: 5000 });
  const reply = Promise.withResolvers<RelayStats>();
  conn.onFrame((type, payload) => {
    if (type !== FrameType.CONTROL) return;
    const message = decodeControl(payload);
    if (message.t === "relay-stats") reply.resolve({ bytesIn: message.bytesIn, bytesOut: message.bytesOut, used: message.used, runs: message.runs });
  });
  conn.send(FrameType.CONTROL, encodeControl({ t: "relay-stats?", run: "" }));
  try {
    return await reply.promise;
  } finally {
    conn.close();
  }
}

/**
 * A relay's counters once its clients' last requests (the gather's
 * releases among them) are applied: two readings 100 ms apart agree.
 */
async function settledRelayStats(relay: LongRelay, psk: Uint8Array): Promise<RelayStats> {
  let last = await relayStats(relay, psk);
  for (let tries = 0; tries < 100; tries++) {
    await Bun.sleep(100);
    const now = await relayStats(relay, psk);
    if (Object.keys(now).every((k) => now[k as keyof RelayStats] === last[k as keyof RelayStats])) return now;
    last = now;
  }
  throw new Error(`relay ${relay.address}: its counters still moved 10 s after the run ended`);
}

/** One eviction, its relays `relays` (none: direct) of the `longRelays` that outlive it. */
async function sgmRun(dir: string, psk: string, memMiB: number, n: number, longRelays: LongRelay[], relays: LongRelay[], digestThreads: number): Promise<SgmRun> {
  const key = loadPsk(psk);
  const pair = await startPair(dir, `sgm${relays.length}r${digestThreads}t${n}m${memMiB}`, { memMiB, seed: 1, rate: 0 });
  const relayBefore = await Promise.all(
    relays.map(async (r) => {
      // the peak RSS from here on: VmHWM starts again at the current RSS
      await Bun.write(`/proc/${r.relay.proc.pid}/clear_refs`, "5");
      return { counters: await processCounters(r.relay.proc.pid), bytesIn: (await relayStats(r, key)).bytesIn };
    }),
  );
  const { result: [s, g], machine } = await accounted(pair, async () => {
    const { gather, port } = await startGather([pair], psk, [...(relays.length > 0 ? ["--max-rate", "256MiB/s"] : []), "--digest-threads", String(digestThreads)]);
    const via = relays.length > 0 ? ["--all-relays", "--via", relays.map((r) => r.address).join(",")] : [];
    const scatter = await startScatter([pair], port, psk, [...via, "--digest-threads", String(digestThreads)]);
    return [await scatter.result(), await gather.result()] as const;
  });
  if (s.code !== 0 || g.code !== 0) throw new Error(`sgm failed:\n${s.stderr}\n${g.stderr}`);
  const sr = report<ScatterReport & { process: Resources }>(s);
  const gr = report<GatherReport & { process: Resources }>(g);
  const streamBytes = sr.vms[0]!.bytes.fromSource;
  const roles = new Map<string, Resources & { bytes: number }>();
  roles.set("scatter", { ...sr.process, bytes: streamBytes });
  roles.set("gather", { ...gr.process, bytes: streamBytes });
  for (const [i, r] of relays.entries()) {
    const before = relayBefore[i]!;
    const { bytesIn } = await settledRelayStats(r, key);
    const after = await processCounters(r.relay.proc.pid);
    const spent = (f: (x: Resources) => number) => f(after) - f(before.counters);
    // a relay carries what it took in, and gives it out again
    roles.set(`relay ${i + 1}`, {
      cpuUserSeconds: spent((x) => x.cpuUserSeconds),
      cpuSystemSeconds: spent((x) => x.cpuSystemSeconds),
      mainThreadCpuSeconds: spent((x) => x.mainThreadCpuSeconds!),
      minorPageFaults: spent((x) => x.minorPageFaults),
      peakRssBytes: after.peakRssBytes,
      bytes: bytesIn - before.bytesIn,
    });
  }
  await killAll(longRelays.map((r) => r.relay.proc));
  return { totalMs: gr.vms[0]!.totalMs!, evictionMs: sr.vms[0]!.evictionMs!, streamBytes, roles, machine };
}

/** A relay's runs after its first, which filled its fresh memory; all, if there was only one. */
function relayRuns(list: SgmRun[]): SgmRun[] {
  return list.length > 1 ? list.slice(1) : list;
}

/** The median over runs of what `f` gives for `role`, per GiB that role carried. */
function perGiB(list: SgmRun[], role: string, f: (r: Resources) => number): number {
  return median(list.map((r) => f(r.roles.get(role)!) / (r.roles.get(role)!.bytes / GiB)));
}

async function main(memMiB: number, runs: number, prealloc: boolean): Promise<void> {
  const dir = makeTempDir("bench-cost");
  const qemuMs: number[] = [];
  const qemuMachine: MachineAccount[] = [];
  const sockets: SocketRun[] = [];
  const nativeSockets: SocketRun[] = [];
  const sgm: Record<string, SgmRun[]> = { "sgm direct": [], "sgm direct, 2 digest threads": [], "sgm via 2 relays": [] };
  const smallMiB = Math.max(128, Math.floor(memMiB / 4));
  const small: SgmRun[] = [];
  try {
    const psk = await writePsk(dir);
    const relays = await startRelays(psk, 2, prealloc);
    for (let n = 0; n < runs; n++) {
      sockets.push(await rawSocket(memMiB * 2 ** 20, "bun"));
      nativeSockets.push(await rawSocket(memMiB * 2 ** 20, "native"));
      const pair = await startPair(dir, `qemu${n}`, { memMiB, seed: 1, rate: 0 });
      const own = await accounted(pair, () => migrateDirect(pair.source, pair.destination, dir, { maxBandwidth: 64 * GiB }));
      qemuMs.push(own.result.totalMs);
      qemuMachine.push(own.machine);
      await killAll(relays.map((r) => r.relay.proc));
      sgm["sgm direct"]!.push(await sgmRun(dir, psk, memMiB, n, relays, [], 0));
      small.push(await sgmRun(dir, psk, smallMiB, n, relays, [], 0));
      sgm["sgm direct, 2 digest threads"]!.push(await sgmRun(dir, psk, memMiB, n, relays, [], 2));
      sgm["sgm via 2 relays"]!.push(await sgmRun(dir, psk, memMiB, n, relays, relays, 0));
    }
  } finally {
    await killAll();
    removeDir(dir);
  }

  const qemu = median(qemuMs);
  console.log(`\n${memMiB} MiB test guest (churn region on, TCG), loopback, median of ${runs} runs${prealloc ? ", relays started with --prealloc" : ""}\n`);
  const send = median(sockets.map((r) => r.sendCpu));
  const receive = median(sockets.map((r) => r.receiveCpu));
  const sha = digestPerGiB(true);
  const shaOne = digestPerGiB(false);
  const nativeReceive = median(nativeSockets.map((r) => r.receiveCpu));
  console.log(`Bun socket, loopback: ${(median(sockets.map((r) => r.rate)) / 2 ** 20).toFixed(0)} MiB/s; CPU s/GiB ${send.toFixed(2)} to send, ${receive.toFixed(2)} to receive`);
  console.log(
    `Bun socket into read(2) to one buffer (bun:ffi): ${(median(nativeSockets.map((r) => r.rate)) / 2 ** 20).toFixed(0)} MiB/s; CPU s/GiB ${median(nativeSockets.map((r) => r.sendCpu)).toFixed(2)} to send, ${nativeReceive.toFixed(2)} to receive`,
  );
  console.log(
    `BLAKE3 of every 4 KiB page, one thread: ${sha.toFixed(2)} CPU s/GiB 128 pages a call (${batchDigestNative ? `${digestLanes} pages side by side` : "a page at a time"}), ${shaOne.toFixed(2)} a page a call`,
  );
  console.log(`QEMU precopy, uncapped: ${Math.round(qemu)} ms (${((memMiB / qemu) * 1000).toFixed(0)} MiB/s)\n`);
  console.log("| how | role | CPU user s/GiB | CPU system s/GiB | CPU total s/GiB | of it the main thread | page faults /GiB | read past Bun's socket, MiB/GiB | written by sgm's threads, MiB/GiB | hashed by helpers, MiB/GiB | peak RSS | wall rate | total / QEMU |");
  console.log("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
  for (const [how, list] of Object.entries(sgm)) {
    const total = median(list.map((r) => r.totalMs));
    const rate = median(list.map((r) => r.streamBytes / (r.totalMs / 1000)));
    const row = (role: string, label: string, runsOf: SgmRun[]) => {
      const per = (f: (r: Resources) => number) => perGiB(runsOf, role, f);
      const user = per((r) => r.cpuUserSeconds);
      const system = per((r) => r.cpuSystemSeconds);
      const faults = per((r) => r.minorPageFaults);
      const main = per((r) => r.mainThreadCpuSeconds ?? NaN);
      const rss = median(runsOf.map((r) => r.roles.get(role)!.peakRssBytes)) / 2 ** 20;
      const native = per((r) => r.bytesReceivedNatively ?? NaN) / 2 ** 20;
      const nativeSent = per((r) => r.bytesSentNatively ?? NaN) / 2 ** 20;
      const helped = (per((r) => r.pagesHashedByHelpers ?? NaN) * 4096) / 2 ** 20;
      const mib = (n: number) => (Number.isNaN(n) ? "" : n.toFixed(0));
      console.log(
        `| ${how} | ${label} | ${user.toFixed(2)} | ${system.toFixed(2)} | ${(user + system).toFixed(2)} | ${main.toFixed(2)} | ${Math.round(faults)} | ${mib(native)} | ${mib(nativeSent)} | ${mib(helped)} | ${rss.toFixed(0)} MiB | ${(rate / 2 ** 20).toFixed(0)} MiB/s | ${(total / qemu).toFixed(1)}x |`,
      );
    };
    for (const role of list[0]!.roles.keys()) {
      if (!role.startsWith("relay") || list.length === 1) row(role, role, list);
      else {
        row(role, role, relayRuns(list));
        row(role, `${role}, its first run`, list.slice(0, 1));
      }
    }
    console.log(`| ${how} | (eviction ${Math.round(median(list.map((r) => r.evictionMs)))} ms, total ${Math.round(total)} ms) | | | | | | | | | | | |`);
  }

  const direct = sgm["sgm direct"]!;
  // per run, the line through its two sizes: medians of slope and intercept
  const split = (role: string, f: (r: Resources) => number) => {
    const lines = direct.map((big, i) => {
      const [b, l] = [big.roles.get(role)!, small[i]!.roles.get(role)!];
      const perGiB = (f(b) - f(l)) / ((b.bytes - l.bytes) / GiB);
      return { perGiB, fixed: f(b) - perGiB * (b.bytes / GiB) };
    });
    return { perGiB: median(lines.map((x) => x.perGiB)), fixed: median(lines.map((x) => x.fixed)) };
  };
  const cpu = (x: Resources) => x.cpuUserSeconds + x.cpuSystemSeconds;
  const mainCpu = (x: Resources) => x.mainThreadCpuSeconds ?? NaN;
  console.log(`
sgm direct, ${memMiB} and ${smallMiB} MiB guests: what each GiB of the stream adds, and what a process costs whatever it moves (the line through both sizes)
`);
  console.log("| role | CPU s per GiB added | of it the main thread | CPU s per process | of it the main thread |");
  console.log("|---|---|---|---|---|");
  for (const role of ["scatter", "gather"]) {
    const [all, main] = [split(role, cpu), split(role, mainCpu)];
    console.log(`| ${role} | ${all.perGiB.toFixed(2)} | ${main.perGiB.toFixed(2)} | ${all.fixed.toFixed(2)} | ${main.fixed.toFixed(2)} |`);
  }

  // Every role receives each byte, hashes each page once and sends each
  // byte on: what Bun's sockets and the hash alone cost for that, measured
  // above, is a floor under its CPU per GiB that no work in sgm's own code removes.
  const floor = receive + sha + send;
  // as in the table: the medians of user and of system seconds, added
  const cpuOf = (how: string, role: string) =>
    perGiB(sgm[how]!, role, (x) => x.cpuUserSeconds) + perGiB(sgm[how]!, role, (x) => x.cpuSystemSeconds);
  const relayed = relayRuns(sgm["sgm via 2 relays"]!);
  const relayCpu = perGiB(relayed, "relay 1", (x) => x.cpuUserSeconds) + perGiB(relayed, "relay 1", (x) => x.cpuSystemSeconds);
  const rows: Array<[string, string, string, string]> = [
    ["scatter CPU s/GiB, direct", "1.0", cpuOf("sgm direct", "scatter").toFixed(2), split("scatter", cpu).perGiB.toFixed(2)],
    ["gather CPU s/GiB, direct", "1.2", cpuOf("sgm direct", "gather").toFixed(2), split("gather", cpu).perGiB.toFixed(2)],
    [`relay CPU s/GiB, PUT and GET (${runs > 1 ? "after its first run" : "its first run"}; alone: relay.bench.ts)`, "0.4", relayCpu.toFixed(2), ""],
  ];
  // the same with a receive path that reads into sgm's own buffers, which Bun's sockets have not
  const nativeFloor = nativeReceive + sha + send;
  console.log(`\nGoals (issue 11) against this run; floor: receive ${receive.toFixed(2)} + BLAKE3 ${sha.toFixed(2)} + send ${send.toFixed(2)} = ${floor.toFixed(2)} CPU s/GiB`);
  console.log(`(receiving with read(2) into one buffer instead: ${nativeReceive.toFixed(2)} + ${sha.toFixed(2)} + ${send.toFixed(2)} = ${nativeFloor.toFixed(2)})\n`);
  console.log("| goal | at most | this run | per GiB added (above) | floor | floor, native receive |");
  console.log("|---|---|---|---|---|---|");
  for (const [what, goal, now, added] of rows) console.log(`| ${what} | ${goal} | ${now} | ${added} | ${floor.toFixed(2)} | ${nativeFloor.toFixed(2)} |`);
  for (const how of ["sgm direct", "sgm via 2 relays"]) {
    const gatherRss = median(sgm[how]!.map((r) => r.roles.get("gather")!.peakRssBytes)) / 2 ** 20;
    console.log(`| gather peak RSS, ${how.replace("sgm ", "")} (${memMiB} MiB VM) | 256 MiB for 1 GiB | ${gatherRss.toFixed(0)} MiB | | | |`);
  }
  console.log(`| total time direct / QEMU's | 2.0x | ${(median(direct.map((r) => r.totalMs)) / qemu).toFixed(1)}x | | | |`);
  printMachineAccounts(
    qemuMachine,
    direct.map((r) => ({ machine: r.machine, scatterCpu: cpu(r.roles.get("scatter")!), gatherCpu: cpu(r.roles.get("gather")!), streamBytes: r.streamBytes })),
    floor,
    qemu,
  );
}
