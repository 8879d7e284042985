// Benchmark (not a test): an idle guest migrated on loopback, once by QEMU's
// own precopy straight to the destination (at QEMU's default bandwidth cap
// and uncapped) and once through sgm scatter and gather, in one run.
//
//   bun test/benchmarks/eviction.bench.ts [MiB, default 1024] [dirty pages/s, default 0]

import type { GatherReport } from "../../core/gather/engine.ts";
import type { ScatterReport } from "../../core/scatter/engine.ts";
import { report, startGather, startPair, startScatter, writePsk } from "../harness/cluster.ts";
import { migrateDirect } from "../harness/direct.ts";
import { killAll } from "../harness/processes.ts";
import { makeTempDir, removeDir } from "../harness/tmp.ts";

const memMiB = Number(process.argv[2] ?? 1024);
const rate = Number(process.argv[3] ?? 0);
const dir = makeTempDir("bench-eviction");

interface Row {
  how: string;
  evictionMs: number | null;
  totalMs: number;
  downtimeMs: number;
}

const rows: Row[] = [];
try {
  for (const [how, maxBandwidth] of [
    ["QEMU precopy, default 128 MiB/s cap", undefined],
    ["QEMU precopy, uncapped", 64 * 1024 ** 3],
  ] as const) {
    const pair = await startPair(dir, `direct${rows.length}`, { memMiB, seed: 1, rate, churn: 0 });
    const r = await migrateDirect(pair.source, pair.destination, dir, { maxBandwidth });
    // In precopy the source is free only once the destination has it all.
    rows.push({ how, evictionMs: r.totalMs, totalMs: r.totalMs, downtimeMs: r.downtimeMs });
    await killAll();
  }

  const psk = await writePsk(dir);
  const pair = await startPair(dir, "sgm", { memMiB, seed: 1, rate, churn: 0 });
  const { gather, port } = await startGather([pair], psk);
  const scatter = await startScatter([pair], port, psk);
  const [s, g] = [await scatter.result(), await gather.result()];
  if (s.code !== 0 || g.code !== 0) throw new Error(`sgm failed:\n${s.stderr}\n${g.stderr}`);
  const sr = report<ScatterReport>(s).vms[0]!;
  const gr = report<GatherReport>(g).vms[0]!;
  rows.push({ how: "sgm scatter -> gather (direct)", evictionMs: sr.evictionMs, totalMs: gr.totalMs!, downtimeMs: sr.downtimeMs! });
} finally {
  await killAll();
  removeDir(dir);
}

console.log(`\nidle ${memMiB} MiB guest (TCG), dirtying ${rate} pages/s, loopback, one run:\n`);
console.log("how".padEnd(40), "eviction".padStart(10), "total".padStart(10), "downtime".padStart(10));
for (const r of rows) {
  const ms = (v: number | null) => (v === null ? "-" : `${Math.round(v)} ms`).padStart(10);
  console.log(r.how.padEnd(40), ms(r.evictionMs), ms(r.totalMs), ms(r.downtimeMs));
}
