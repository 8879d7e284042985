// A real Linux guest (Debian's cloud kernel, busybox, and an init of our own
// that churns memory the way real guests do: see test/linux-guest) evicted
// through the compiled sgm, relays included. QEMU 10.0 at both ends: QEMU
// 7.2's TCG loses guest writes from its own dirty log (see the README), so
// a 7.2 source may legitimately send a page older than its final memory.

import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import type { GatherReport } from "../core/gather/engine.ts";
import type { EvacuationReport } from "../core/scatter/evacuation.ts";
import type { ScatterReport } from "../core/scatter/engine.ts";
import { report, startGather, startRelay, startScatter, writePsk } from "./harness/cluster.ts";
import { expectDestinationAsMapped, expectGuestRunsOn, expectMemoryEqual, sourceAgainstMap, startLinuxPair } from "./harness/linux-pair.ts";
import { killAll } from "./harness/processes.ts";
import { qemu10_0 } from "./harness/qemu-binaries.ts";
import { expectExit, startSgm } from "./harness/sgm.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";

let dir: string;
let psk: string;

beforeAll(async () => {
  dir = makeTempDir("linux");
  psk = await writePsk(dir);
});
afterEach(() => killAll());
afterAll(() => removeDir(dir));

describe("a real Linux guest", () => {
  test("one VM through two relays arrives with every page equal, and runs on", async () => {
    const binary = await qemu10_0();
    const pair = await startLinuxPair(dir, "lx1", { binary, seed: 31, paused: true });
    const relays = await Promise.all([startRelay(psk), startRelay(psk)]);
    // a gather slower than the source, so that relays take pages
    const { gather, port } = await startGather([pair], psk, ["--max-rate", "32MiB/s"]);
    // every relay named, whatever the rate probes measure on a busy machine: a
    // probe that finds the source no faster than the gather leaves relays out
    const maps = join(dir, "lx1-maps");
    mkdirSync(maps);
    const scatter = await startScatter([pair], port, psk, ["--keep-source", "--all-relays", "--via", relays.map((r) => r.address).join(",")], { SGM_TEST_MAP_DIR: maps });
    const [s, g] = await Promise.all([scatter.result(), gather.result()]);
    expectExit(s, 0);
    expectExit(g, 0);
    const sr = report<ScatterReport>(s);
    expect(sr.placement.relayedPages).toBeGreaterThan(0);
    expect(sr.placement.dedupPages).toBeGreaterThan(0);
    expect(report<GatherReport>(g).bytesFromRelays).toBeGreaterThan(0);

    // the destination holds exactly what the source's stream carried, and that is the source's final memory
    const destination = await expectDestinationAsMapped(pair, dir, maps);
    const { source, unlike, described } = await sourceAgainstMap(pair, dir, maps);
    const why = "QEMU's TCG dirty log lost a write (README, Notes from running against QEMU), or scatter misread the stream";
    expect(unlike, `${unlike.length} frames of the source's final memory are not what scatter read from its stream last (${described}); the destination holds what the stream carried: ${why}`).toEqual([]);
    await expectMemoryEqual(pair, dir, { source, destination });
    await pair.destination.qmp.execute("cont");
    await expectGuestRunsOn(pair);
  }, 300_000);

  test("two VMs at once through one relay: shared content sent once, both guests run on", async () => {
    const binary = await qemu10_0();
    const pairs = await Promise.all([startLinuxPair(dir, "lx2", { binary, seed: 32 }), startLinuxPair(dir, "lx3", { binary, seed: 33 })]);
    // room for both VMs whole: the plan sends direct only what the 48 MiB/s gather takes while a fast relay
    // takes the rest, and 1 GiB was short of that by a few MiB when this machine's relay measured fast
    const relay = await startRelay(psk, "2GiB");
    const { gather, port } = await startGather(pairs, psk, ["--max-rate", "48MiB/s"]);
    const scatter = await startScatter(pairs, port, psk, ["--all-relays", "--via", relay.address]);
    // the scatter first: if it fails, the gather would wait for it until the test's timeout
    const s = await scatter.result();
    expectExit(s, 0);
    const g = await gather.result();
    expectExit(g, 0);
    const sr = report<ScatterReport>(s);
    const placed = `placement: ${JSON.stringify(sr.placement)}; scatter said:\n${s.stderr.split("\n").filter((l) => l.includes("relay")).join("\n")}`;
    // the same kernel and busybox in both: much of one VM is sent as references to the other's
    expect(sr.placement.dedupPages, placed).toBeGreaterThan(10_000);
    expect(sr.placement.relayedPages, placed).toBeGreaterThan(0);
    for (const pair of pairs) await expectGuestRunsOn(pair);
  }, 300_000);

  test("evacuated one at a time, each to its own destination, through one relay: what the first put there the second holds, not sent again", async () => {
    const binary = await qemu10_0();
    const pairs = await Promise.all([startLinuxPair(dir, "lx4", { binary, seed: 34 }), startLinuxPair(dir, "lx5", { binary, seed: 35 })]);
    // room for both VMs whole: each run's plan reserves what its gather will not take, and with 1 GiB the
    // second VM's 522 MiB did not fit beside the first's reservation when the relay measured fast
    const relay = await startRelay(psk, "2GiB");
    // gathers slower than the source, so that the relay takes pages
    const gathers = await Promise.all(pairs.map((pair) => startGather([pair], psk, ["--max-rate", "32MiB/s"])));
    const map = join(dir, "lx.map");
    await Bun.write(map, pairs.map((pair, i) => `${pair.name} ${pair.source.qmpPath} 127.0.0.1:${gathers[i]!.port}\n`).join(""));
    const evacuate = await startSgm(["evacuate", "--map", map, "--via", relay.address, "--all-relays", "--max-in-flight", "1", "--psk-file", psk, "--json"]);
    // evacuate first: if a VM stays here, its gather would wait for it until the test's timeout
    const e = await evacuate.result();
    expectExit(e, 0);
    const g = await Promise.all(gathers.map((x) => x.gather.result()));
    for (const result of g) expectExit(result, 0);
    const r = report<EvacuationReport>(e);
    // the VMs are the same size, so which goes first depends on which gather answered first
    const later = [...r.vms].sort((a, b) => (a.startedAfterMs ?? 0) - (b.startedAfterMs ?? 0))[1]!;
    const second = r.destinations.find((d) => d.to === later.to)!.run!.placement;
    // the same kernel and busybox in both: the relay kept what the first VM's run put there, for the second's
    expect(second.sharedPages, JSON.stringify(r.destinations.map((d) => d.run?.placement))).toBeGreaterThan(1000);
    for (const pair of pairs) await expectGuestRunsOn(pair);
  }, 300_000);
});
