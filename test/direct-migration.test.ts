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
  const source = await TestVm.start({ dir, name: "src", memMiB: 128, seed: 11, rate: 2000 });
  const destination = await TestVm.start({ dir, name: "dst", memMiB: 128, seed: 11, rate: 2000, incoming: true });
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
}, 120_000);

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
