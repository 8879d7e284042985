// Benchmark (not a test): precopy and postcopy switchover side by side, for
// an idle guest and busy ones, in one run: eviction time, total migration
// time, downtime, and what the source QEMU sent. A precopy run that has not
// finished after the bound is stopped and reported as such.
//
//   bun test/benchmarks/switchover.bench.ts [MiB, default 256] [bound seconds, default 30]

import type { GatherReport } from "../../core/gather/engine.ts";
import type { ScatterReport } from "../../core/scatter/engine.ts";
import { report, startGather, startPair, startScatter, writePsk } from "../harness/cluster.ts";
import { killAll } from "../harness/processes.ts";
import { makeTempDir, removeDir } from "../harness/tmp.ts";

const memMiB = Number(process.argv[2] ?? 256);
const boundMs = Number(process.argv[3] ?? 30) * 1000;
const dir = makeTempDir("bench-switchover");

const guests = [
  { label: "idle", rate: 0 },
  { label: "busy, 20k pages/s", rate: 20_000 },
  { label: "very busy, 1M pages/s", rate: 1_000_000 },
];
const modes = [
  { label: "precopy", args: ["--switchover", "precopy"] },
  { label: "postcopy after 2 passes", args: ["--switchover", "postcopy", "--postcopy-after-pass", "2"] },
  { label: "postcopy at once", args: ["--switchover", "postcopy", "--postcopy-after-pass", "0"] },
];

const lines: string[] = [];
try {
  const psk = await writePsk(dir);
  let n = 0;
  for (const guest of guests) {
    for (const mode of modes) {
      const pair = await startPair(dir, `b${n++}`, { memMiB, seed: 5, rate: guest.rate, churn: 0 });
      const { gather, port } = await startGather([pair], psk);
      const scatter = await startScatter([pair], port, psk, mode.args);
      const timer = setTimeout(() => scatter.proc.kill("SIGINT"), boundMs);
      const s = await scatter.result();
      clearTimeout(timer);
      const sr = report<ScatterReport>(s).vms[0]!;
      const cell = (v: number | null) => (v === null ? "-" : `${v} ms`).padStart(9);
      if (!sr.ok) {
        gather.proc.kill("SIGKILL");
        lines.push(`${guest.label.padEnd(22)} ${mode.label.padEnd(24)} not evicted within ${boundMs / 1000} s (${sr.passes} passes, ${(sr.bytes.fromSource / 2 ** 20).toFixed(0)} MiB sent by the source)`);
      } else {
        const g = await gather.result();
        const gr = report<GatherReport>(g).vms[0]!;
        lines.push(
          `${guest.label.padEnd(22)} ${mode.label.padEnd(24)} ${cell(sr.evictionMs)} ${cell(gr.totalMs)} ${cell(sr.downtimeMs)} ` +
            `${`${(sr.bytes.fromSource / 2 ** 20).toFixed(0)} MiB`.padStart(9)}  ${sr.switchover} after ${sr.passes} passes, ${gr.pages.requestedFromSource} pages asked of the source`,
        );
      }
      await killAll();
    }
  }
} finally {
  await killAll();
  removeDir(dir);
}
console.log(`\n${memMiB} MiB guest (TCG), direct to the gather, one run:\n`);
console.log(`${"guest".padEnd(22)} ${"switchover".padEnd(24)} ${"eviction".padStart(9)} ${"total".padStart(9)} ${"downtime".padStart(9)} ${"source".padStart(9)}`);
for (const line of lines) console.log(line);
