// Choosing a run's relays before anything moves, through the compiled
// binary: the plan picks what the rule gives and touches no VM, a plan short
// of relay memory stops the run, and relays shared by two runs at once hold
// no more than their capacity.

import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import type { RelayStats } from "../core/relay/engine.ts";
import type { ScatterReport } from "../core/scatter/engine.ts";
import type { RelayPlan } from "../core/scatter/relay-plan.ts";
import { queryMigrate } from "../core/qmp/migration.ts";
import { haltAndCompare, report, startGather, startPair, startRelay, startScatter, type VmPair, writePsk } from "./harness/cluster.ts";
import { killAll } from "./harness/processes.ts";
import { expectExit } from "./harness/sgm.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";

let dir: string;
let psk: string;

beforeAll(async () => {
  dir = makeTempDir("relay-choice");
  psk = await writePsk(dir);
});
afterEach(() => killAll());
afterAll(() => removeDir(dir));

async function untouched(pair: VmPair): Promise<void> {
  expect((await queryMigrate(pair.source.qmp)).status ?? "none").toBe("none");
  expect(await pair.source.status()).toBe("running");
}

async function relayFigures(r: Awaited<ReturnType<typeof startRelay>>): Promise<RelayStats> {
  r.relay.proc.kill("SIGTERM");
  return report<RelayStats>(await r.relay.result());
}

describe("choosing relays", () => {
  test("--plan on three relays of different room and rate picks the rule's set, says why the third is out, and moves nothing", async () => {
    const pair = await startPair(dir, "plan", { memMiB: 128, seed: 301 });
    // Rates held so low that only the fast relay's own probe depends on the machine: the set below is the rule's
    // whenever it measures above about 14 MiB/s, however the three rank (a fresh clone's suite once measured a relay
    // held to 100 MiB/s below 30). A held relay probes a little above its rate (its bucket holds 10 ms), the gather
    // by its first 256 KiB: 8.3 and 2.25 MiB/s here.
    const [fastSmall, roomy, slow] = await Promise.all([
      startRelay(psk, "64MiB", ["--max-rate", "200MiB/s", "--json"]),
      startRelay(psk, "1GiB", ["--max-rate", "8MiB/s", "--json"]),
      startRelay(psk, "1GiB", ["--max-rate", "2MiB/s", "--json"]),
    ]);
    const { gather, port } = await startGather([pair], psk, ["--max-rate", "2MiB/s"]);
    const via = [slow, roomy, fastSmall].map((r) => r.address).join(",");
    // The destination and the roomy relay fall short of 24 MiB/s, so the roomy one alone is not enough; the fast one
    // holds 64 MiB of the ~100 MiB or more that will not go direct (the destination would have to probe above 13
    // MiB/s for less), so it is not enough alone either. Together they take the rate and the room; the slowest is
    // not needed.
    const s = await (await startScatter([pair], port, psk, ["--plan", "--source-rate", "24MiB/s", "--via", via])).result();
    expectExit(s, 0);
    const plan = report<RelayPlan>(s);
    expect(plan.chosen.map((r) => r.address).sort()).toEqual([fastSmall.address, roomy.address].sort());
    expect(plan.leftOut).toEqual([{ address: slow.address, reason: expect.stringMatching(/^not needed: /) }]);
    expect(plan.sourceRateFrom).toBe("--source-rate");
    expect(plan.shortfall).toBeNull();
    expect(plan.vms).toEqual([expect.objectContaining({ name: "plan", ramBytes: 128 << 20, balloonedBytes: 0 })]);
    // the probe measured the roomy relay at its held rate (and its burst), not the link's, GiB/s here
    expect(plan.chosen.find((r) => r.address === roomy.address)!.rate).toBeLessThan(4 * 8 * (1 << 20));
    for (const r of plan.chosen) expect(r.expectedBytes).toBeGreaterThan(0);
    expect(s.stderr).toMatch(/plan fits: the eviction would start/);
    expect(s.stderr).toContain(`relay ${slow.address} left out: not needed`);

    await untouched(pair);
    // nothing placed, nothing reserved, and the gather still waits for its scatter
    for (const r of [fastSmall, roomy, slow]) expect(await relayFigures(r)).toMatchObject({ peakUsed: 0, reserved: 0, runs: 0 });
    gather.proc.kill("SIGTERM");
    expectExit((await gather.result()), 130);
  }, 120_000);

  test("a plan short of relay memory exits 78 naming it, and so does the run, with the VM running on untouched", async () => {
    const pair = await startPair(dir, "short", { memMiB: 128, seed: 302 });
    const [a, b] = await Promise.all([startRelay(psk, "16MiB"), startRelay(psk, "16MiB")]);
    const { port } = await startGather([pair], psk, ["--max-rate", "5MiB/s"]);
    const via = ["--via", `${a.address},${b.address}`, "--source-rate", "100MiB/s"];
    const planned = await (await startScatter([pair], port, psk, ["--plan", ...via])).result();
    expectExit(planned, 78);
    expect(planned.stderr).toMatch(/plan falls short: the relays can hold 32\.0 MiB of the 1\d\d\.\d MiB that will not go direct \(1 copy\)/);
    expect(report<RelayPlan>(planned).shortfall?.kind).toBe("relay-memory");

    const run = await (await startScatter([pair], port, psk, via)).result();
    expectExit(run, 78);
    expect(run.stderr).toMatch(/sgm: error: the relays can hold 32\.0 MiB of the 1\d\d\.\d MiB that will not go direct \(1 copy\)\n$/);
    await untouched(pair);
  }, 120_000);

  test("two scatters sharing one relay at once both complete, and the relay never holds more than its capacity", async () => {
    const pairs = await Promise.all([startPair(dir, "share1", { memMiB: 64, seed: 303, rate: 1000 }), startPair(dir, "share2", { memMiB: 64, seed: 304, rate: 1000 })]);
    const shared = await startRelay(psk, "96MiB", ["--json"]);
    // slow gathers: each run wants about 68 MiB of the relay, more than the two can have together
    const gathers = await Promise.all(pairs.map((p) => startGather([p], psk, ["--max-rate", "8MiB/s"])));
    const scatters = await Promise.all(
      pairs.map((p, i) => startScatter([p], gathers[i]!.port, psk, ["--keep-source", "--via", shared.address, "--source-rate", "200MiB/s", "--allow-shortfall"])),
    );
    const results = await Promise.all(scatters.map((s) => s.result()));
    for (const r of results) expectExit(r, 0);
    for (const g of gathers) expectExit((await g.gather.result()), 0);
    const reports = results.map((r) => report<ScatterReport>(r));
    // both runs placed pages there, and what did not fit beside the other's reservation went direct
    for (const r of reports) expect(r.relays[0]!.pages).toBeGreaterThan(1000);
    const placed = reports.reduce((sum, r) => sum + r.relays[0]!.pages * 4096, 0);
    const wanted = reports.reduce((sum, r) => sum + r.plan!.bytes - r.plan!.directBytes, 0);
    expect(wanted).toBeGreaterThan(96 << 20);
    expect(placed).toBeLessThanOrEqual(96 << 20);
    const figures = await relayFigures(shared);
    expect(figures.peakUsed).toBeLessThanOrEqual(96 << 20);
    expect(figures).toMatchObject({ used: 0, reserved: 0, runs: 0 });
    for (const pair of pairs) {
      const { verified, comparison } = await haltAndCompare(pair, dir);
      expect(verified).toBe(true);
      expect(comparison.mismatched).toEqual([]);
    }
  }, 300_000);
});
