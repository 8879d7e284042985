// Source and destination QEMUs running the Linux test guest (see
// linux-guest.ts), and the proof that a guest arrived intact: its memory
// equal to the source's final memory where the destination waited paused
// (-S), and the guest's own checks passing as it runs on.

import { expect } from "bun:test";
import type { VmPair } from "./cluster.ts";
import { compareExactly, dumpMemory, framesUnlikeMap, mapsToZero, readFinalMap } from "./memory.ts";
import { type QemuBinary, TestVm } from "./qemu.ts";

export const LINUX_GUEST = { randMiB: 64, churnMiB: 64, churnRate: 2000 };

export interface LinuxPairOptions {
  binary: QemuBinary;
  seed: number;
  memMiB?: number;
  /** The destination starts with -S: after the switchover it waits, paused, for `cont`. */
  paused?: boolean;
}

/** Resolves once the source guest has filled its memory and checked it once. */
export async function startLinuxPair(dir: string, name: string, options: LinuxPairOptions): Promise<VmPair> {
  const common = { dir, memMiB: options.memMiB ?? 512, seed: options.seed, linux: LINUX_GUEST, binary: options.binary };
  const [source, destination] = await Promise.all([
    TestVm.start({ ...common, name }),
    TestVm.start({ ...common, name: `${name}-in`, incoming: true, extraArgs: options.paused ? ["-S"] : [] }),
  ]);
  await source.waitSerial(/SGMLINUX check n=1 ok/, 180_000);
  const none = { dataStart: 0, dataEnd: 0, scratchStart: 0, scratchEnd: 0, churnStart: 0, tableStart: 0, tableEnd: 0 };
  return { name, source, destination, layout: { seed: options.seed, ...none } };
}

/** Every page of the paused destination equals the source's final memory (each dumped here unless given). */
export async function expectMemoryEqual(pair: VmPair, dir: string, dumps: { source?: Uint8Array; destination?: Uint8Array } = {}): Promise<void> {
  const source = dumps.source ?? (await dumpMemory(pair.source, dir, "final"));
  const destination = dumps.destination ?? (await dumpMemory(pair.destination, dir, "arrived"));
  expect(compareExactly(source, destination)).toEqual([]);
}

/** What the source's final memory holds against the scatter's final map (see sourceAgainstMap). */
export interface SourceAgainstMap {
  /** The source's final memory, dumped. */
  source: Uint8Array;
  /** Frames whose content is not what the map names: the stream, as scatter read it, never carried it. */
  unlike: number[];
  /** The first of them, with the words the source begins them with. */
  described: string;
}

/**
 * The source (kept, paused, after the migration) against the scatter's
 * final map (a scatter run with SGM_TEST_MAP_DIR=mapDir): a frame whose
 * content the map does not name is one the stream, as scatter read it,
 * never carried at its last content, though every check of sgm's passed.
 */
export async function sourceAgainstMap(pair: VmPair, dir: string, mapDir: string): Promise<SourceAgainstMap> {
  const source = await dumpMemory(pair.source, dir, "final");
  const map = readFinalMap(mapDir, pair.name);
  const unlike = framesUnlikeMap(source, map);
  const described = unlike
    .slice(0, 5)
    .map((frame) => {
      const words = new Uint32Array(source.buffer, source.byteOffset + frame * 4096, 4);
      const streamed = mapsToZero(map, frame) ? "a zero page" : "other content";
      return `frame 0x${frame.toString(16)}: the source begins ${[...words].map((w) => w.toString(16).padStart(8, "0")).join(" ")}, the stream carried ${streamed}`;
    })
    .join("; ");
  return { source, unlike, described };
}

/** Every page of the paused destination is what the scatter's final map names: it was given exactly the stream. Returns the dump. */
export async function expectDestinationAsMapped(pair: VmPair, dir: string, mapDir: string): Promise<Uint8Array> {
  const destination = await dumpMemory(pair.destination, dir, "arrived");
  const unlike = framesUnlikeMap(destination, readFinalMap(mapDir, pair.name));
  expect(unlike, `${pair.name}: frames of the paused destination unlike the scatter's final map`).toEqual([]);
  return destination;
}

const TROUBLE = /SGMCHURN BAD|SGMLINUX check n=\d+ BAD|Kernel panic|Oops|BUG:|general protection|segfault|Call Trace/;

/**
 * The guest runs on at the destination: two more full sweeps of its churned
 * memory and one more checksum round, all ok, and nothing the kernel would
 * print about broken memory.
 */
export async function expectGuestRunsOn(pair: VmPair): Promise<void> {
  // the source's log may begin after its last check (a source restored from a saved state)
  const before = pair.source.serialText();
  const sweep = Number([...before.matchAll(/SGMCHURN sweep=(\d+)/g)].at(-1)?.[1] ?? -1);
  const check = Number([...before.matchAll(/SGMLINUX check n=(\d+)/g)].at(-1)?.[1] ?? 0);
  const swept = await waitCount(pair.destination, /SGMCHURN sweep=(\d+) (\w+)/g, sweep + 2);
  const checked = await waitCount(pair.destination, /SGMLINUX check n=(\d+) (\w+)/g, check + 1);
  const after = pair.destination.serialText();
  const trouble = after.split("\n").filter((line) => TROUBLE.test(line));
  // the lines of trouble first: a failure names them even where the soak prints one line of it
  const tail = `${pair.name} at the destination printed${trouble.length > 0 ? ` ${trouble.length} lines of trouble, first: ${trouble.slice(0, 5).join(" / ")}; and` : ""}, last:\n${after.split("\n").slice(-30).join("\n")}`;
  expect(trouble, tail).toEqual([]);
  expect(swept, tail).toBe("ok");
  expect(checked, tail).toBe("ok");
}

/** Waits for a line of `pattern` numbered at least `atLeast` (or for trouble); returns its verdict. */
async function waitCount(vm: TestVm, pattern: RegExp, atLeast: number, timeoutMs = 120_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = vm.serialText();
    const hit = [...text.matchAll(pattern)].find((m) => Number(m[1]) >= atLeast);
    if (hit) return hit[2]!;
    if (TROUBLE.test(text)) return "trouble";
    if (Date.now() > deadline) throw new Error(`${vm.name}: no ${pattern.source} numbered ${atLeast} or more within ${timeoutMs} ms; got:\n${text.slice(-2000)}`);
    if (vm.proc.exitCode !== null) throw new Error(`${vm.name}: QEMU exited (${vm.proc.exitCode})`);
    await Bun.sleep(25);
  }
}
