// make demo: empties a "host" of a VM whose destination is slow. The VM (the
// test guest, dirtying its memory) is evicted through the compiled sgm:
// scatter, two relays and a gather held to a low receive rate, all separate
// processes on this machine. For comparison, QEMU's own precopy migrates the
// same kind of VM over a link of the same rate. Then the destination's memory
// is proved equal to the source's.

import type { GatherReport } from "../core/gather/engine.ts";
import type { ScatterReport } from "../core/scatter/engine.ts";
import { haltAndCompare, report, startGather, startPair, startRelay, startScatter, writePsk } from "../test/harness/cluster.ts";
import { migrateDirect } from "../test/harness/direct.ts";
import { killAll } from "../test/harness/processes.ts";
import { makeTempDir, removeDir } from "../test/harness/tmp.ts";

const memMiB = 256;
const dirtyRate = 2000;
const linkMiB = 32;
const dir = makeTempDir("demo");
const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
const s1 = (ms: number | null) => (ms === null ? "-" : `${(ms / 1000).toFixed(2)} s`);

try {
  console.log(`a ${memMiB} MiB VM (QEMU 7.2, TCG) dirtying ${dirtyRate} pages/s; the destination receives at most ${linkMiB} MiB/s\n`);

  console.log("1. QEMU's own precopy, source straight to destination at that rate");
  const plain = await startPair(dir, "plain", { memMiB, seed: 42, rate: dirtyRate });
  const direct = await migrateDirect(plain.source, plain.destination, dir, { maxBandwidth: linkMiB * 2 ** 20 });
  await killAll();

  console.log("2. sgm: scatter -> two relays and the gather (held to the same rate) -> destination");
  const psk = await writePsk(dir);
  const pair = await startPair(dir, "demo", { memMiB, seed: 42, rate: dirtyRate });
  const [r1, r2] = await Promise.all([startRelay(psk), startRelay(psk)]);
  const { gather, port } = await startGather([pair], psk, ["--max-rate", `${linkMiB}MiB/s`]);
  const scatter = await startScatter([pair], port, psk, ["--keep-source", "--via", `${r1.address},${r2.address}`]);
  const s = await scatter.result();
  const g = await gather.result();
  process.stderr.write(`\n${s.stderr}${g.stderr}\n`);
  if (s.code !== 0 || g.code !== 0) throw new Error(`sgm failed (scatter exit ${s.code}, gather exit ${g.code})`);
  const sr = report<ScatterReport>(s);
  const gr = report<GatherReport>(g);
  const evicted = sr.vms[0]!;
  const arrived = gr.vms[0]!;

  const { verified, comparison } = await haltAndCompare(pair, dir);
  console.log("");
  console.log("                          QEMU precopy     sgm");
  console.log(`eviction time             ${s1(direct.totalMs).padEnd(16)} ${s1(evicted.evictionMs)}   (source host free of the VM's state)`);
  console.log(`total migration time      ${s1(direct.totalMs).padEnd(16)} ${s1(arrived.totalMs)}   (destination holds every page)`);
  console.log(`downtime                  ${`${Math.round(direct.downtimeMs)} ms`.padEnd(16)} ${evicted.downtimeMs} ms`);
  console.log("");
  console.log("sgm bytes per path:");
  console.log(`  source QEMU -> scatter          ${mib(evicted.bytes.fromSource)}`);
  console.log(`  scatter -> gather (direct)      ${mib(sr.bytesToGather)}`);
  for (const r of sr.relays) console.log(`  scatter -> relay ${r.address.padEnd(15)} ${mib(r.bytesSent)}`);
  for (const r of gr.relays) console.log(`  relay ${r.address.padEnd(15)} -> gather ${mib(r.bytesIn)}`);
  console.log(`  gather -> destination QEMU      ${mib(arrived.bytes.toQemu)}`);
  console.log(`  saved by dedup                  ${mib(evicted.bytes.dedupSaved)}`);
  console.log(`pages after switchover: ${arrived.pages.deliveredPages} delivered, ${arrived.pages.requestedPagesServed} of them on the guest's request`);
  console.log(`guest self-check: ${verified ? "every page intact" : "FAILED"}`);
  console.log(
    `memory vs source: ${comparison.identical} pages identical, ${comparison.rewrittenAfter} rewritten by the guest after it resumed, ${comparison.mismatched.length} wrong`,
  );
  for (const r of [r1, r2]) r.relay.proc.kill("SIGINT");
  if (!verified || comparison.mismatched.length > 0) process.exitCode = 1;
} finally {
  await killAll();
  removeDir(dir);
}
