// make bench: the paper's experiment on one machine. A bed of hosts
// (network namespaces joined by shaped veth links: test/harness/bed.ts) with
// a source, three relays and a destination; every QEMU and sgm process runs
// in its host, so QEMU's own migrations cross the same links as sgm's. Each
// method empties the source of 1, 2 and 4 VMs at once, three times; every
// guest must arrive intact and run on. Prints a markdown table, and writes
// the raw figures as JSON and a chart as PNG.
//
//   bun test/benchmarks/paper.bench.ts [--quick] [--vms 1,2,4] [--reps 3]
//     [--methods precopy,postcopy,sgm-0,...] [--sweep-methods precopy,postcopy,sgm-3]
//     [--workload busy|idle|dirty] [--mem-mib 512] [--source-rate 2gbit]
//     [--relay-rate 1gbit] [--destination-rate 250mbit] [--delay-ms 0.2]
//     [--qemu-limit-s 60] [--markdown FILE] [--json FILE] [--png FILE]
//
// Every method runs for one VM; for more VMs at once, the --sweep-methods
// (default: QEMU's two and sgm with 3 relays), so that the default set fits
// in 20 minutes on 2 cores. --sweep-methods all runs every one.

import { mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { createBed, type Bed } from "../harness/bed.ts";
import { writePsk } from "../harness/cluster.ts";
import { expectGuestRunsOn } from "../harness/linux-pair.ts";
import { killAll } from "../harness/processes.ts";
import { qemu10_0 } from "../harness/qemu-binaries.ts";
import { sgmBinary } from "../harness/sgm.ts";
import { makeTempDir, removeDir } from "../harness/tmp.ts";
import { Guests, type VmAt, type Workload } from "./paper/guests.ts";
import { CpuMeter, METHODS, runMethod, type Timing } from "./paper/methods.ts";
import { cpuTable, type LinkBytes, markdownTable, ratios, renderChart, type RunRecord, summarize } from "./paper/results.ts";

const { values: flags } = parseArgs({
  options: {
    quick: { type: "boolean", default: false },
    vms: { type: "string", default: "1,2,4" },
    reps: { type: "string", default: "3" },
    methods: { type: "string", default: METHODS.map((m) => m.id).join(",") },
    "sweep-methods": { type: "string", default: "precopy,postcopy,sgm-3" },
    workload: { type: "string", default: "busy" },
    "mem-mib": { type: "string", default: "512" },
    "source-rate": { type: "string", default: "2gbit" },
    "relay-rate": { type: "string", default: "1gbit" },
    "destination-rate": { type: "string", default: "250mbit" },
    "delay-ms": { type: "string", default: "0.2" },
    "qemu-limit-s": { type: "string", default: "60" },
    markdown: { type: "string" },
    json: { type: "string" },
    png: { type: "string" },
  },
});

const vmCounts = flags.quick ? [1] : flags.vms.split(",").map(Number);
const reps = flags.quick ? 1 : Number(flags.reps);
const pick = (flag: string, ids: string) =>
  (ids === "all" ? METHODS.map((m) => m.id) : ids.split(",")).map((id) => {
    const m = METHODS.find((x) => x.id === id);
    if (!m) throw new Error(`${flag}: no method '${id}' (have ${METHODS.map((x) => x.id).join(", ")})`);
    return m;
  });
const methods = pick("--methods", flags.methods);
const sweepMethods = pick("--sweep-methods", flags["sweep-methods"]).filter((m) => methods.includes(m));
const workload = flags.workload as Workload;
if (!["busy", "idle", "dirty"].includes(workload)) throw new Error(`--workload '${workload}': busy, idle or dirty`);
const memMiB = Number(flags["mem-mib"]);
const qemuLimitMs = Number(flags["qemu-limit-s"]) * 1000;
/** sgm must finish: a run this long has failed. */
const SGM_LIMIT_MS = 300_000;
const rates = { source: flags["source-rate"], relay: flags["relay-rate"], destination: flags["destination-rate"] };
const BITS = /^(\d+(?:\.\d+)?)([kmg]?)bit$/;
const bytesPerSecond = (rate: string) => {
  const m = BITS.exec(rate);
  if (!m) throw new Error(`rate '${rate}': expected a tc rate such as 2gbit or 250mbit`);
  return (Number(m[1]) * { "": 1, k: 1e3, m: 1e6, g: 1e9 }[m[2] as "" | "k" | "m" | "g"]) / 8;
};
const sourceBytesPerSecond = bytesPerSecond(rates.source);
for (const rate of [rates.relay, rates.destination]) bytesPerSecond(rate);

const dir = makeTempDir("bench");
const hosts = ["src", "relay1", "relay2", "relay3", "dst"];
let bed: Bed | undefined;
let guests: Guests | undefined;
const cleanUp = async () => {
  await killAll();
  bed?.destroy();
  guests?.removeSaved();
  removeDir(dir);
};
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.on(signal, () => {
    process.stderr.write(`\n${signal}: tearing the bed down\n`);
    void cleanUp().finally(() => process.exit(130));
  });
}

const runs: RunRecord[] = [];
const started = performance.now();
const log = (line: string) => process.stderr.write(`[${((performance.now() - started) / 1000).toFixed(0).padStart(4)} s] ${line}\n`);
try {
  const binary = await qemu10_0();
  await sgmBinary();
  const psk = await writePsk(dir);
  guests = new Guests({ workload, memMiB, binary }, dir);
  log(`preparing ${Math.max(...vmCounts)} ${workload} guests of ${memMiB} MiB`);
  await guests.prepare(Math.max(...vmCounts));
  bed = createBed(
    [
      { name: "src", egress: rates.source },
      { name: "relay1", egress: rates.relay, ingress: rates.relay },
      { name: "relay2", egress: rates.relay, ingress: rates.relay },
      { name: "relay3", egress: rates.relay, ingress: rates.relay },
      { name: "dst", ingress: rates.destination },
    ],
    { delayMs: Number(flags["delay-ms"]) },
  );
  for (const vms of vmCounts) {
    for (let rep = 0; rep < reps; rep++) {
      // each repetition in another order, so that no method always follows the same one
      const set = vms === 1 ? methods : sweepMethods;
      const order = set.map((_, i) => set[(i + rep) % set.length]!);
      for (const method of order) {
        const record = await runOnce(bed, guests, vms, rep, method, psk);
        runs.push(record);
        const t = record.timing;
        log(
          `${vms} VM ${method.id} rep ${rep + 1}: ${t ? `eviction ${(t.evictionMs / 1000).toFixed(2)} s, total ${(t.totalMs / 1000).toFixed(2)} s, downtime ${Math.round(t.downtimeMs)} ms` : `did not finish: ${record.error}`}` +
            `${record.intact ? "" : `; GUEST NOT INTACT: ${record.verifyError}`}`,
        );
      }
    }
  }
} finally {
  await cleanUp();
}

const unique = new Map(vmCounts.map((n) => [n, guests!.uniqueBytes(n)]));
const summaries = summarize(runs, methods, (n) => unique.get(n)! / sourceBytesPerSecond);
const delay = bed!.delayApplied ? `${flags["delay-ms"]} ms delay` : "no delay (this kernel has no tc netem)";
const heading =
  `${workload} ${workload === "dirty" ? "test" : "Linux"} guests of ${memMiB} MiB, QEMU 10.0 (TCG); source ${rates.source}, ` +
  `relays ${rates.relay}, destination ${rates.destination}, ${delay}; median of ${reps} (min–max); ${Math.round((performance.now() - started) / 60_000)} min`;
const markdown = [
  `${heading}\n\n${markdownTable(summaries)}\n${cpuTable(summaries)}`,
  ...ratios(summaries).map((line) => `- ${line}`),
  ...vmCounts.map((n) => `- ${n} VM${n > 1 ? "s" : ""}: ${(unique.get(n)! / 2 ** 20).toFixed(0)} MiB of distinct non-zero pages`),
].join("\n");
console.log(markdown);
if (flags.markdown) await Bun.write(flags.markdown, `${markdown}\n`);

if (flags.json) {
  await Bun.write(flags.json, `${JSON.stringify({ heading, workload, memMiB, rates, delayApplied: bed!.delayApplied, uniqueBytes: Object.fromEntries(unique), summaries, runs }, null, 2)}\n`);
}
if (flags.png) await Bun.write(flags.png, await renderChart(summaries, `Eviction and total migration time, ${workload} guests of ${memMiB} MiB`));
const failed = runs.filter((r) => !r.intact || (r.timing === null && methods.find((m) => m.id === r.method)!.kind === "sgm"));
process.exit(failed.length > 0 ? 1 : 0);

async function runOnce(bed: Bed, guests: Guests, vms: number, rep: number, method: (typeof METHODS)[number], psk: string): Promise<RunRecord> {
  // a folder per run: no socket or log of an earlier run in the way
  const runDir = join(dir, `run${runs.length}`);
  mkdirSync(runDir);
  const at = await guests.start(vms, runDir, bed.exec("src", []), bed.exec("dst", []));
  const before = new Map(hosts.map((h) => [h, bed.linkBytes(h)]));
  let timing: Timing | null = null;
  let error: string | undefined;
  const cpu = new CpuMeter();
  for (const vm of at) {
    cpu.track("sourceQemu", vm.source.proc.pid);
    cpu.track("destinationQemu", vm.destination.proc.pid);
  }
  const log: string[] = [];
  const t0 = performance.now();
  try {
    timing = await runMethod(method, { bed, vms: at, psk, qemuLimitMs, sgmLimitMs: SGM_LIMIT_MS, sourceRate: sourceBytesPerSecond, cpu, log });
  } catch (err) {
    error = (err as Error).message.split("\n")[0];
  }
  const wallMs = performance.now() - t0;
  const spent = cpu.read();
  const links: Record<string, LinkBytes> = {};
  for (const h of hosts) {
    const now = bed.linkBytes(h);
    links[h] = { tx: now.tx - before.get(h)!.tx, rx: now.rx - before.get(h)!.rx };
  }
  let intact = true;
  let verifyError: string | undefined;
  if (timing) {
    try {
      await Promise.all(at.map((vm, v) => verify(vm, v)));
    } catch (err) {
      intact = false;
      verifyError = (err as Error).message.split("\n").slice(0, 4).join(" ");
    }
  }
  await killAll();
  rmSync(runDir, { recursive: true, force: true });
  return { vms, rep, method: method.id, timing, error, intact, verifyError, links, wallMs, cpu: spent, cpuToEviction: cpu.atEviction, log };
}

/** The guest checks itself at the destination: the Linux guest runs on, the test guest verifies every page as it halts. */
async function verify(vm: VmAt, v: number): Promise<void> {
  if (workload === "dirty") {
    const halted = await vm.destination.haltGuest();
    if (!halted.verified) throw new Error(`vm${v}: the guest's own check failed: ${halted.report}`);
    return;
  }
  const none = { dataStart: 0, dataEnd: 0, scratchStart: 0, scratchEnd: 0, churnStart: 0, tableStart: 0, tableEnd: 0 };
  await expectGuestRunsOn({ name: `vm${v}`, source: vm.source, destination: vm.destination, layout: { seed: 0, ...none } });
}
