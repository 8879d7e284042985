// What saving a VM's state for --resume costs the gather right after RUN
// (a precopy source): the snapshot, which the VM's first page requests wait
// behind, and the write, which goes on beside delivery; and what reading it
// back costs a resumed gather; for VMs of growing size.
// Run: bun test/benchmarks/resume-state.bench.ts [GiB,...]   (a script, not a test)
//
// Every page unique (the most digests a state can hold), a quarter of them
// still owed at the switch, and the bytes of 32 MiB of them held only here
// (the gather's bound on what it holds). Best of five after a warm-up.

import { rmSync } from "node:fs";
import { join } from "node:path";
import { DIGEST_BYTES, digestPage, PAGE_BYTES } from "../../core/dedup/digest.ts";
import { ContentDirectory } from "../../core/gather/content-directory.ts";
import { claimSavedState, snapshotFeedState } from "../../core/gather/feed-state.ts";
import { PageTable } from "../../core/gather/page-table.ts";
import { loadResumeState, saveResumeState } from "../../core/gather/resume-state.ts";
import { finalMapDigest } from "../../core/gather/final-checks.ts";
import { makeTempDir, removeDir } from "../harness/tmp.ts";

const sizes = (process.argv[2] ?? "0.25,1,4").split(",").map(Number);
const dir = makeTempDir("resume-bench");
const LOCAL_BYTES = 32 * 1024 * 1024;

console.log("| VM | state | snapshot, VM waits (ms) | write, in the background (ms) | load and check (ms) |\n|---|---|---|---|---|");
for (const gib of sizes) {
  const pages = Math.round((gib * 2 ** 30) / PAGE_BYTES);
  const blocks = [{ name: "pc.ram", usedLength: pages * PAGE_BYTES }];
  const t = new PageTable(blocks);
  const dir0 = new ContentDirectory(() => {});
  const page = new Uint8Array(PAGE_BYTES);
  const digest = new Uint8Array(DIGEST_BYTES);
  const view = new DataView(page.buffer);
  let local = 0;
  for (let i = 0; i < pages; i++) {
    view.setUint32(0, i);
    digestPage(page, digest);
    const cid = dir0.intern(digest, 0);
    t.content[i] = cid;
    if (i % 4 !== 0) {
      t.delivered[i] = 1;
      t.fed[i] = cid;
      continue;
    }
    dir0.need(cid);
    t.owing[i] = 1;
    if (local < LOCAL_BYTES) {
      dir0.receive(cid, page);
      local += PAGE_BYTES;
    } else dir0.locate(cid, 1);
  }
  const map = finalMapDigest("bench", t, dir0);
  const path = join(dir, `bench-${gib}.resume`);
  const who = { name: "bench", blocks, sectionId: 2, run: "00".repeat(16), relays: ["127.0.0.1:1"], map, startedAt: null, sourceQemu: null };
  let taken = snapshotFeedState(who, t, dir0);
  const snapshot = await best(() => {
    taken.release();
    taken = snapshotFeedState(who, t, dir0);
  });
  const state = taken.state;
  let bytes = 0;
  const write = await best(async () => {
    bytes = await saveResumeState(path, state);
  });
  taken.release();
  const load = await best(() => {
    claimSavedState(loadResumeState(path), new PageTable(blocks), new ContentDirectory(() => {}));
  });
  console.log(`| ${gib} GiB | ${(bytes / 2 ** 20).toFixed(1)} MiB | ${snapshot.toFixed(0)} | ${write.toFixed(0)} | ${load.toFixed(0)} |`);
  rmSync(path);
}
removeDir(dir);

async function best(run: () => unknown): Promise<number> {
  await run();
  let ms = Infinity;
  for (let r = 0; r < 5; r++) {
    const t0 = performance.now();
    await run();
    ms = Math.min(ms, performance.now() - t0);
  }
  return ms;
}
