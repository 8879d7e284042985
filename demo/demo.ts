// make demo: migrates a dirtying test VM from one QEMU to another on this
// machine and prints what it measured.

import { compareGuestMemory, dumpMemory } from "../test/harness/memory.ts";
import { migrateDirect } from "../test/harness/direct.ts";
import { killAll } from "../test/harness/processes.ts";
import { TestVm } from "../test/harness/qemu.ts";
import { makeTempDir, removeDir } from "../test/harness/tmp.ts";

const dir = makeTempDir("demo");
try {
  const memMiB = 256;
  console.log(`starting a ${memMiB} MiB test VM (TCG) that dirties 5000 pages/s, and an empty destination QEMU`);
  const source = await TestVm.start({ dir, name: "demo-src", memMiB, seed: 42, rate: 5000 });
  const destination = await TestVm.start({ dir, name: "demo-dst", memMiB, seed: 42, rate: 5000, incoming: true });
  const layout = await source.waitFilled();
  console.log("guest memory filled; migrating with QEMU's own precopy (direct, no sgm yet)");
  const result = await migrateDirect(source, destination, dir);
  const halted = await destination.haltGuest();
  const comparison = compareGuestMemory(await dumpMemory(source, dir, "final"), await dumpMemory(destination, dir, "halted"), layout);
  console.log(`total migration time   ${result.totalMs.toFixed(0)} ms`);
  console.log(`downtime               ${result.downtimeMs.toFixed(0)} ms (QEMU says ${result.qemuDowntimeMs} ms)`);
  console.log(`bytes sent             ${(result.transferredBytes / 2 ** 20).toFixed(1)} MiB`);
  console.log(`guest self-check       ${halted.verified ? "every page intact" : "FAILED"}`);
  console.log(`memory vs source       ${comparison.identical} pages identical, ${comparison.rewrittenAfter} rewritten after resume, ${comparison.mismatched.length} wrong`);
  if (!halted.verified || comparison.mismatched.length > 0) process.exitCode = 1;
} finally {
  await killAll();
  removeDir(dir);
}
