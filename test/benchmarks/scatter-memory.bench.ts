// Benchmark (not a test): scatter's memory while it evicts a 1 GiB VM
// through two relays to a gather held to a low rate, so nearly everything is
// placed on relays and backpressure is exercised. Prints the peak resident
// size of the scatter process, sampled from /proc every 20 ms.
//
//   bun test/benchmarks/scatter-memory.bench.ts [MiB, default 1024] [gather rate, default 64MiB/s]

import { readFileSync } from "node:fs";
import type { ScatterReport } from "../../core/scatter/engine.ts";
import { report, startGather, startPair, startRelay, startScatter, writePsk } from "../harness/cluster.ts";
import { killAll } from "../harness/processes.ts";
import { makeTempDir, removeDir } from "../harness/tmp.ts";

const memMiB = Number(process.argv[2] ?? 1024);
const rate = process.argv[3] ?? "64MiB/s";
const dir = makeTempDir("bench-memory");

function statusKiB(pid: number, field: string): number {
  try {
    const m = readFileSync(`/proc/${pid}/status`, "utf8").match(new RegExp(`^${field}:\\s+(\\d+) kB`, "m"));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

try {
  const psk = await writePsk(dir);
  const pair = await startPair(dir, "mem", { memMiB, seed: 9, rate: 0, churn: 0 });
  const [r1, r2] = await Promise.all([startRelay(psk, "2GiB"), startRelay(psk, "2GiB")]);
  const { gather, port } = await startGather([pair], psk, ["--max-rate", rate]);
  const scatter = await startScatter([pair], port, psk, ["--via", `${r1.address},${r2.address}`]);
  const pid = scatter.proc.pid;
  let peak = 0;
  const sampler = setInterval(() => {
    peak = Math.max(peak, statusKiB(pid, "VmHWM"), statusKiB(pid, "VmRSS"));
  }, 20);
  const s = await scatter.result();
  clearInterval(sampler);
  await gather.result();
  if (s.code !== 0) throw new Error(`scatter failed:\n${s.stderr}`);
  const sr = report<ScatterReport>(s);
  const vm = sr.vms[0]!;
  console.log(`\n${memMiB} MiB VM evicted in ${vm.evictionMs} ms through 2 relays, gather held to ${rate}:`);
  console.log(`  pages: ${sr.placement.directPages} straight to the gather, ${sr.placement.relayedPages} to relays`);
  console.log(`  scatter peak resident memory: ${(peak / 1024).toFixed(0)} MiB`);
  console.log(`  (the VM's RAM is ${memMiB} MiB; the scatter never holds more than its send windows)`);
} finally {
  await killAll();
  removeDir(dir);
}
