// Benchmark (not a test): what scatter and gather hold while they move VMs
// of growing size, through two relays, with the gather held to a low rate so
// that nearly everything is placed on relays and every bound is exercised.
// Peak resident size is each process's own (getrusage, in its --json
// report), Bun's runtime included. Bounded means: the same for every size.
//
//   bun test/benchmarks/memory.bench.ts [MiB,MiB,... default 256,1024,2048] [gather rate, default 64MiB/s]

import type { GatherReport } from "../../core/gather/engine.ts";
import type { ScatterReport } from "../../core/scatter/engine.ts";
import { report, startGather, startPair, startRelay, startScatter, writePsk } from "../harness/cluster.ts";
import { killAll } from "../harness/processes.ts";
import { makeTempDir, removeDir } from "../harness/tmp.ts";

type WithProcess<T> = T & { process: { peakRssBytes: number } };

const sizes = (process.argv[2] ?? "256,1024,2048").split(",").map(Number);
const rate = process.argv[3] ?? "64MiB/s";
const rows: string[] = [];
const MiB = 2 ** 20;

for (const memMiB of sizes) {
  const dir = makeTempDir("bench-memory");
  try {
    const psk = await writePsk(dir);
    const pair = await startPair(dir, `mem${memMiB}`, { memMiB, seed: 9, rate: 0 });
    const [r1, r2] = await Promise.all([startRelay(psk, "4GiB"), startRelay(psk, "4GiB")]);
    const { gather, port } = await startGather([pair], psk, ["--max-rate", rate]);
    const scatter = await startScatter([pair], port, psk, ["--via", `${r1.address},${r2.address}`]);
    const [s, g] = [await scatter.result(), await gather.result()];
    if (s.code !== 0 || g.code !== 0) throw new Error(`sgm failed:\n${s.stderr}\n${g.stderr}`);
    const sr = report<WithProcess<ScatterReport>>(s);
    const gr = report<WithProcess<GatherReport>>(g);
    const mib = (bytes: number) => `${(bytes / MiB).toFixed(0)} MiB`;
    rows.push(
      `| ${memMiB} MiB | ${sr.placement.directPages} / ${sr.placement.relayedPages} | ${mib(sr.process.peakRssBytes)} | ${mib(gr.process.peakRssBytes)} |`,
    );
  } finally {
    await killAll();
    removeDir(dir);
  }
}

console.log(`\nTest guest (churn region on) through 2 relays, gather held to ${rate}\n`);
console.log("| VM | pages direct / to relays | scatter peak RSS | gather peak RSS |");
console.log("|---|---|---|---|");
for (const row of rows) console.log(row);
