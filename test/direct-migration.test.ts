// The bench itself under test: QEMU migrates the dirtying test guest straight
// to another QEMU, and the memory comparison proves the two equal. If this
// fails, no sgm test can be trusted.

import { afterAll, beforeAll, expect, test } from "bun:test";
import { checkWord, compareGuestMemory, dumpMemory } from "./harness/memory.ts";
import { migrateDirect } from "./harness/direct.ts";
import { killAll } from "./harness/processes.ts";
import { TestVm } from "./harness/qemu.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";

let dir: string;
beforeAll(() => {
  dir = makeTempDir("direct");
});
afterAll(async () => {
  await killAll();
  removeDir(dir);
});

test("direct QEMU-to-QEMU migration of a dirtying guest keeps every page", async () => {
  const source = await TestVm.start({ dir, name: "src", memMiB: 128, seed: 11, rate: 2000, churn: 300 });
  const destination = await TestVm.start({ dir, name: "dst", memMiB: 128, seed: 11, rate: 2000, churn: 300, incoming: true });
  const layout = await source.waitFilled();
  await Bun.sleep(300); // let it dirty a while first

  const result = await migrateDirect(source, destination, dir);
  expect(result.downtimeMs).toBeGreaterThan(0);
  expect(await destination.status()).toBe("running");
  expect(await source.status()).toBe("postmigrate");

  await Bun.sleep(200); // the destination dirties on, to be told apart from the source's final state
  const halted = await destination.haltGuest();
  expect(halted.report).toContain("SGMGUEST verify ok");

  const comparison = compareGuestMemory(await dumpMemory(source, dir, "final"), await dumpMemory(destination, dir, "halted"), layout);
  expect(comparison.mismatched).toEqual([]);
  expect(comparison.identical).toBeGreaterThan(comparison.pages / 2);
  expect(comparison.rewrittenAfter).toBeGreaterThan(0);
  expect(comparison.churnRewrittenAfter).toBeGreaterThan(0);
}, 120_000);

test("one wrong churn page is noticed by the guest's own check and by the memory proof", async () => {
  const vm = await TestVm.start({ dir, name: "spoil", memMiB: 32, seed: 5, churn: 100 });
  const layout = await vm.waitFilled();
  const dump = await dumpMemory(vm, dir, "before");
  await vm.sendSerial("x");
  const halted = await vm.haltGuest();
  expect(halted.report).toMatch(/SGMGUEST bad churn page=\d+ want=\d+/);
  expect(halted.report).toContain("SGMGUEST verify bad=1\n");

  // in a dump: a churn page holding another page's content under its own entry
  const frame = (layout.churnStart + 4096 * 7) / 4096;
  const moved = dump.slice();
  moved.copyWithin(frame * 4096, frame * 4096 + 4096, frame * 4096 + 8192);
  const differs = Buffer.compare(dump.subarray(frame * 4096, frame * 4096 + 4096), moved.subarray(frame * 4096, frame * 4096 + 4096)) !== 0;
  expect(differs).toBe(true);
  expect(compareGuestMemory(dump, moved, layout).mismatched).toEqual([frame]);
  // an entry older at the destination than at the source is stale, whatever the page holds
  const older = dump.slice();
  const entry = new Uint32Array(older.buffer, layout.tableStart + 8 * 7, 2);
  entry[1] = entry[1]! - 1;
  expect(compareGuestMemory(dump, older, layout).mismatched).toEqual([frame]);
  expect(compareGuestMemory(older, dump, layout)).toMatchObject({ mismatched: [], churnRewrittenAfter: 1 });
}, 60_000);

test("the comparison notices a page the destination lacks", async () => {
  const source = await TestVm.start({ dir, name: "src2", memMiB: 32, seed: 3 });
  const layout = await source.waitFilled();
  const dump = await dumpMemory(source, dir, "a");
  const damaged = dump.slice();
  damaged.fill(0, layout.dataStart + 4096 * 5, layout.dataStart + 4096 * 6);
  // The source's final copy of a page is version 7; a destination holding the
  // intact version 0 has a stale page, not one "rewritten after".
  const newer = dump.slice();
  const frame = layout.dataStart / 4096 + 9;
  const words = new Uint32Array(newer.buffer, frame * 4096, 8);
  words[2] = 7;
  words[6] = checkWord(frame, 7, layout.seed, words[4]!, words[5]!);
  expect(compareGuestMemory(newer, dump, layout).mismatched).toEqual([frame]);
  expect(compareGuestMemory(dump, newer, layout)).toMatchObject({ mismatched: [], rewrittenAfter: 1 });
  expect(compareGuestMemory(dump, damaged, layout).mismatched).toEqual([layout.dataStart / 4096 + 5]);
  expect(compareGuestMemory(dump, dump, layout).mismatched).toEqual([]);

  // A source stopped inside a header write leaves it torn; the destination
  // resumes and finishes it. Only that one page, and only finished or newer.
  const torn = newer.slice();
  new Uint32Array(torn.buffer, frame * 4096, 8)[6] = 12345;
  expect(compareGuestMemory(torn, newer, layout)).toMatchObject({ mismatched: [], finishedAfter: 1 });
  expect(compareGuestMemory(torn, dump, layout).mismatched).toEqual([frame]);
  await source.kill();
}, 60_000);
