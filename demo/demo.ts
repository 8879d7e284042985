// make demo: evicts a test VM that dirties its memory, from one QEMU to
// another on this machine, through the compiled sgm (scatter and gather as
// separate processes), then proves the destination's memory and prints what
// it measured.

import type { GatherReport } from "../core/gather/engine.ts";
import type { ScatterReport } from "../core/scatter/engine.ts";
import { report, startGather, startPair, startScatter, writePsk } from "../test/harness/cluster.ts";
import { compareGuestMemory, dumpMemory } from "../test/harness/memory.ts";
import { killAll } from "../test/harness/processes.ts";
import { makeTempDir, removeDir } from "../test/harness/tmp.ts";

const memMiB = 256;
const rate = 5000;
const dir = makeTempDir("demo");
const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
try {
  console.log(`starting a ${memMiB} MiB test VM (QEMU 7.2, TCG) that dirties ${rate} pages/s, and an empty destination QEMU`);
  const psk = await writePsk(dir);
  const pair = await startPair(dir, "demo", { memMiB, seed: 42, rate });
  const { gather, port } = await startGather([pair], psk);
  console.log(`guest memory filled; sgm gather listens on 127.0.0.1:${port}; running sgm scatter`);
  const scatter = await startScatter([pair], port, psk, ["--keep-source"]);
  const s = await scatter.result();
  const g = await gather.result();
  process.stderr.write(s.stderr + g.stderr);
  if (s.code !== 0 || g.code !== 0) throw new Error(`sgm failed (scatter ${s.code}, gather ${g.code})`);
  const sr = report<ScatterReport>(s).vms[0]!;
  const gr = report<GatherReport>(g).vms[0]!;

  const halted = await pair.destination.haltGuest();
  const comparison = compareGuestMemory(
    await dumpMemory(pair.source, dir, "final"),
    await dumpMemory(pair.destination, dir, "halted"),
    pair.layout,
  );
  console.log("");
  console.log(`eviction time          ${sr.evictionMs} ms   (source host holds none of the VM's state)`);
  console.log(`total migration time   ${gr.totalMs} ms   (destination QEMU holds every page)`);
  console.log(`downtime               ${sr.downtimeMs} ms   (source STOP to destination RESUME)`);
  console.log(`bytes from source QEMU ${mib(sr.bytes.fromSource)}`);
  console.log(`bytes to the gather    ${mib(report<ScatterReport>(s).bytesToGather)} (dedup saved ${mib(sr.bytes.dedupSaved)})`);
  console.log(`bytes to dest QEMU     ${mib(gr.bytes.toQemu)}`);
  console.log(`pages                  ${gr.pages.fedPages} fed before switchover, ${gr.pages.deliveredPages} after, ${gr.pages.requestedPagesServed} on request`);
  console.log(`guest self-check       ${halted.verified ? "every page intact" : "FAILED"}`);
  console.log(`memory vs source       ${comparison.identical} pages identical, ${comparison.rewrittenAfter} rewritten by the guest after resume, ${comparison.mismatched.length} wrong`);
  if (!halted.verified || comparison.mismatched.length > 0) process.exitCode = 1;
} finally {
  await killAll();
  removeDir(dir);
}
