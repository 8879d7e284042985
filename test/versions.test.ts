// Evictions between the QEMU versions operators run: Debian 12's 7.2 and
// 10.0 (bookworm-backports, unpacked into .cache by the harness), in both
// directions where QEMU supports the pairing, and refused where it does not.

import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import type { GatherReport } from "../core/gather/engine.ts";
import { checkSupported } from "../core/qemu/versions.ts";
import { queryMigrate } from "../core/qmp/migration.ts";
import type { ScatterReport } from "../core/scatter/engine.ts";
import { haltAndCompare, report, startGather, startPair, startScatter, writePsk } from "./harness/cluster.ts";
import { killAll } from "./harness/processes.ts";
import { QEMU_7_2, qemu10_0 } from "./harness/qemu-binaries.ts";
import { type QemuBinary, TestVm } from "./harness/qemu.ts";
import { expectExit } from "./harness/sgm.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";

let dir: string;
let psk: string;
const binaries: Record<string, QemuBinary> = {};

beforeAll(async () => {
  dir = makeTempDir("versions");
  psk = await writePsk(dir);
  binaries["7.2"] = QEMU_7_2;
  binaries["10.0"] = await qemu10_0();
}, 300_000);
afterEach(() => killAll());
afterAll(() => removeDir(dir));

describe("evictions across QEMU versions", () => {
  test.each([
    ["7.2", "7.2", "pc-i440fx-7.2"],
    ["10.0", "10.0", "pc-i440fx-10.0"],
    ["7.2", "10.0", "pc-i440fx-7.2"],
    ["10.0", "7.2", "pc-i440fx-7.2"],
  ])("QEMU %s to QEMU %s on %s: memory equal", async (from, to, machine) => {
    const name = `v${from}to${to}`.replace(/\./g, "");
    const pair = await startPair(dir, name, {
      memMiB: 128,
      seed: 31,
      rate: 3000,
      machine,
      sourceBinary: binaries[from],
      destinationBinary: binaries[to],
    });
    const { gather, port } = await startGather([pair], psk);
    const s = await (await startScatter([pair], port, psk, ["--keep-source"])).result();
    const g = await gather.result();
    expectExit(s, 0);
    expectExit(g, 0);
    const sr = report<ScatterReport>(s).vms[0]!;
    const gr = report<GatherReport>(g).vms[0]!;
    expect(sr.qemu.source.startsWith(`${from}.`)).toBe(true);
    expect(sr.qemu.destination!.startsWith(`${to}.`)).toBe(true);
    expect(gr.qemu).toEqual({ source: sr.qemu.source, destination: sr.qemu.destination!, machine });
    // after the first pass scatter tells a source that takes it (QEMU 8.2 and later) the rate it read that pass at
    if (from === "7.2") expect(sr.switchoverBandwidth).toBeNull();
    else {
      expect(sr.switchoverBandwidth).toBeGreaterThan(0);
      const params = await pair.source.qmp.execute<Record<string, unknown>>("query-migrate-parameters");
      expect(params["avail-switchover-bandwidth"]).toBe(sr.switchoverBandwidth!);
    }

    const { verified, comparison } = await haltAndCompare(pair, dir);
    expect(verified).toBe(true);
    expect(comparison.mismatched).toEqual([]);
  }, 120_000);

  test("a QEMU 10.0 source switching to postcopy (SWITCHOVER_START and all) to 10.0", async () => {
    const pair = await startPair(dir, "pc10", {
      memMiB: 128,
      seed: 33,
      rate: 20_000,
      machine: "pc-i440fx-10.0",
      sourceBinary: binaries["10.0"],
      destinationBinary: binaries["10.0"],
    });
    const { gather, port } = await startGather([pair], psk);
    const s = await (await startScatter([pair], port, psk, ["--keep-source", "--switchover", "postcopy", "--postcopy-after-pass", "0"])).result();
    const g = await gather.result();
    expectExit(s, 0);
    expectExit(g, 0);
    expect(report<ScatterReport>(s).vms[0]!.switchover).toBe("postcopy");
    const { verified, comparison } = await haltAndCompare(pair, dir);
    expect(verified).toBe(true);
    expect(comparison.mismatched).toEqual([]);
  }, 120_000);

  test("different machine types are refused before anything moves, naming both versions", async () => {
    const name = "mtype";
    // a destination on 7.2 cannot run pc-i440fx-10.0: an operator starts it with 7.2's newest
    const [source, destination] = await Promise.all([
      TestVm.start({ dir, name, memMiB: 32, seed: 32, machine: "pc-i440fx-10.0", binary: binaries["10.0"] }),
      TestVm.start({ dir, name: `${name}-in`, memMiB: 32, seed: 32, machine: "pc-i440fx-7.2", incoming: true }),
    ]);
    const pair = { name, source, destination, layout: await source.waitFilled() };
    const { port } = await startGather([pair], psk);
    const s = await (await startScatter([pair], port, psk)).result();
    expectExit(s, 69);
    expect(report<ScatterReport>(s).vms[0]!.error).toBe(
      `VM ${name}: gather: machine types differ: the source (QEMU 10.0.2) runs pc-i440fx-10.0, the destination (QEMU 7.2.22) pc-i440fx-7.2; QEMU migrates only between equal machine types`,
    );
    expect((await queryMigrate(source.qmp)).status ?? "none").toBe("none");
    expect(await source.status()).toBe("running");
  }, 120_000);
});

describe("version policy", () => {
  const v = (major: number, minor: number) => ({ major, minor, micro: 0, package: "" });
  test("7.2 through 10.x are carried", () => {
    for (const ok of [v(7, 2), v(8, 2), v(9, 2), v(10, 0), v(10, 2)]) expect(() => checkSupported(ok, "VM a: the source")).not.toThrow();
  });
  test("older and newer are refused, naming the version", () => {
    expect(() => checkSupported(v(6, 2), "VM a: the source")).toThrow("VM a: the source runs QEMU 6.2.0, older than sgm carries (7.2 and later)");
    expect(() => checkSupported(v(11, 0), "VM a: the destination")).toThrow("VM a: the destination runs QEMU 11.0.0, newer than sgm knows (up to 10.x)");
  });
});
