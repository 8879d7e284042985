// `sgm evacuate` through the compiled binary: VMs bound for several
// destination gathers in one run, at most --max-in-flight at once, largest
// first, each proved to have arrived page for page; and a VM whose
// destination is not there left running at the source while the rest go.

import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import type { EvacuationReport } from "../core/scatter/evacuation.ts";
import { haltAndCompare, relayAcknowledged, report, startGather, startPair, startRelay, type VmPair, writePsk } from "./harness/cluster.ts";
import { killAll } from "./harness/processes.ts";
import { expectExit, type SgmProcess, startSgm } from "./harness/sgm.ts";
import { freePort, makeTempDir, removeDir } from "./harness/tmp.ts";

let dir: string;
let psk: string;

beforeAll(async () => {
  dir = makeTempDir("evacuate");
  psk = await writePsk(dir);
});
afterEach(() => killAll());
afterAll(() => removeDir(dir));

async function writeMap(name: string, lines: Array<[VmPair, number]>): Promise<string> {
  const path = join(dir, name);
  const text = lines.map(([pair, port]) => `${pair.name} ${pair.source.qmpPath} 127.0.0.1:${port}`).join("\n");
  await Bun.write(path, `# VM, its QMP socket, its destination's gather\n${text}\n`);
  return path;
}

async function expectArrivedWhole(pair: VmPair): Promise<void> {
  const { verified, comparison } = await haltAndCompare(pair, dir);
  expect(verified, `${pair.name}: the destination guest's own check`).toBe(true);
  expect(comparison.mismatched, `${pair.name}: pages unlike the source's final memory`).toEqual([]);
}

/**
 * Three VMs (name, MiB, seed; largest first), the first and third bound for
 * one gather and the second for another, through one relay, every gather
 * held to `gatherRate`; runs evacuate from a map listing them in `listed`
 * order, with --keep-source and `extra`, and waits for every process.
 */
async function evacuateThree(vms: Array<[string, number, number]>, listed: number[], gatherRate: string, extra: string[]) {
  const pairs = await Promise.all(vms.map(([name, memMiB, seed]) => startPair(dir, name, { memMiB, seed, rate: 2000 })));
  const relay = await startRelay(psk);
  const one = await startGather([pairs[0]!, pairs[2]!], psk, ["--max-rate", gatherRate]);
  const two = await startGather([pairs[1]!], psk, ["--max-rate", gatherRate]);
  const ports = [one.port, two.port, one.port];
  const map = await writeMap(`${vms[0]![0]}.map`, listed.map((i) => [pairs[i]!, ports[i]!]));
  const evacuate = await startSgm(["evacuate", "--map", map, "--via", relay.address, "--all-relays", "--keep-source", "--psk-file", psk, "--json", ...extra]);
  const [e, g1, g2] = await Promise.all([evacuate.result(), one.gather.result(), two.gather.result()]);
  expectExit(e, 0);
  expectExit(g1, 0);
  expectExit(g2, 0);
  return { pairs, relay, ports: [one.port, two.port], e, r: report<EvacuationReport>(e) };
}

/** The relay held nothing more once every gather was done: each released what its run held. */
async function expectRelayEmpty(relay: { relay: SgmProcess }): Promise<void> {
  relay.relay.proc.kill("SIGTERM");
  expect((await relay.relay.result()).stderr).toMatch(/relay stopped: held 0 B of/);
}

describe("sgm evacuate", () => {
  test("three VMs to two destinations, two at a time, largest first, one relay set: every page arrives equal", async () => {
    // the destinations take less than the source sends: the relay takes the rest;
    // listed smallest first: the order of the file is not the order of the run
    const { pairs, relay, ports, e, r } = await evacuateThree(
      [
        ["big", 192, 301],
        ["mid", 128, 302],
        ["small", 96, 303],
      ],
      [2, 1, 0],
      "64MiB/s",
      ["--max-in-flight", "2", "--digest-threads", "1"],
    );
    expect(r.vms.map((v) => [v.name, v.ok, v.source])).toEqual([
      ["big", true, "paused"],
      ["mid", true, "paused"],
      ["small", true, "paused"],
    ]);
    const [b, m, s] = r.vms;
    // two slots, largest first: the smallest waited, and began only once one of the
    // others was off the host (a slot is given back after its VM's eviction, on one clock)
    expect(s!.startedAfterMs!).toBeGreaterThanOrEqual(Math.min(b!.evictedAfterMs!, m!.evictedAfterMs!));
    expect(r.destinations.map((d) => [d.to, d.vms, d.error])).toEqual([
      [`127.0.0.1:${ports[0]}`, ["big", "small"], null],
      [`127.0.0.1:${ports[1]}`, ["mid"], null],
    ]);
    // one relay set: both runs placed pages on it
    for (const d of r.destinations) expect(d.run!.relays.map((x) => x.address)).toEqual([relay.address]);
    expect(r.destinations.reduce((n, d) => n + d.run!.placement.relayedPages, 0)).toBeGreaterThan(0);
    expect(r.host).toMatchObject({ vms: 3, evicted: 3, failed: 0, emptiedAfterMs: Math.max(...r.vms.map((v) => v.evictedAfterMs!)) });
    expect(e.stderr).toMatch(/evacuated 3 of 3 VMs to 2 destinations: host empty after/);
    await expectRelayEmpty(relay);
    for (const pair of pairs) await expectArrivedWhole(pair);
  }, 300_000);

  test("a VM whose destination is not there runs on at the source; the others are evicted, and the exit says partial (3)", async () => {
    const [here, lost, also] = await Promise.all([
      startPair(dir, "here", { memMiB: 96, seed: 311, rate: 2000 }),
      startPair(dir, "lost", { memMiB: 128, seed: 312, rate: 2000 }),
      startPair(dir, "also", { memMiB: 64, seed: 313, rate: 2000 }),
    ]);
    const gather = await startGather([here, also], psk);
    const nobody = await freePort();
    const map = await writeMap("one-missing.map", [
      [here, gather.port],
      [lost, nobody],
      [also, gather.port],
    ]);
    const evacuate = await startSgm(["evacuate", "--map", map, "--max-in-flight", "1", "--wait-gather", "1", "--keep-source", "--psk-file", psk, "--json"]);
    const [e, g] = await Promise.all([evacuate.result(), gather.gather.result()]);
    expectExit(e, 3);
    expectExit(g, 0);

    const r = report<EvacuationReport>(e);
    const byName = new Map(r.vms.map((v) => [v.name, v]));
    expect(byName.get("here")).toMatchObject({ ok: true, source: "paused" });
    expect(byName.get("also")).toMatchObject({ ok: true, source: "paused" });
    expect(byName.get("lost")).toMatchObject({ ok: false, source: "running", exitCode: 69, eviction: null });
    expect(byName.get("lost")!.error).toContain(`127.0.0.1:${nobody}`);
    expect(r.destinations.find((d) => d.to === `127.0.0.1:${nobody}`)).toMatchObject({ vms: ["lost"], run: null });
    expect(r.host).toMatchObject({ vms: 3, evicted: 2, failed: 1, emptiedAfterMs: null });
    expect(e.stderr).toMatch(/lost → 127\.0\.0\.1:\d+: NOT evicted: .*; the VM is running at the source/);

    expect(await lost.source.status()).toBe("running");
    expect(await lost.source.keepsRunning()).toBe(true);
    for (const pair of [here, also]) await expectArrivedWhole(pair);
  }, 300_000);

  test("a gather not listening yet holds up none of the others: their VMs leave, and its own once it comes", async () => {
    const [late, early] = await Promise.all([
      // the largest: its run would be planned first, were its gather there
      startPair(dir, "late", { memMiB: 128, seed: 321, rate: 2000 }),
      startPair(dir, "early", { memMiB: 64, seed: 322, rate: 2000 }),
    ]);
    const ready = await startGather([early], psk);
    const latePort = await freePort();
    const map = await writeMap("late-gather.map", [
      [late, latePort],
      [early, ready.port],
    ]);
    const evacuate = await startSgm(["evacuate", "--map", map, "--max-in-flight", "1", "--wait-gather", "600", "--keep-source", "--psk-file", psk, "--json"]);
    await evacuate.waitStderr(/waiting for the gather at 127\.0\.0\.1:\d+/, 60_000);
    // early is evicted while the evacuation still waits for late's gather
    await evacuate.waitStderr(/early: running at the destination/, 120_000);
    const comes = await startGather([late], psk, [], latePort);
    const [e, g1, g2] = await Promise.all([evacuate.result(), ready.gather.result(), comes.gather.result()]);
    expectExit(e, 0);
    expectExit(g1, 0);
    expectExit(g2, 0);
    const r = report<EvacuationReport>(e);
    expect(r.vms.map((v) => [v.name, v.ok])).toEqual([
      ["late", true],
      ["early", true],
    ]);
    expect(r.vms[0]!.startedAfterMs!).toBeGreaterThan(r.vms[1]!.evictedAfterMs!);
    for (const pair of [late, early]) await expectArrivedWhole(pair);
  }, 300_000);

  test("--replicas 1, the relay lost while a VM waits for its slot: the first VM's source streams again, the queued one goes without it, both intact", async () => {
    const [first, queued] = await Promise.all([
      startPair(dir, "first", { memMiB: 64, seed: 331, rate: 200 }),
      startPair(dir, "queued", { memMiB: 32, seed: 332, rate: 200 }),
    ]);
    // gather and relay far slower than the source: the first VM is still streaming when the relay goes
    const relay = await startRelay(psk, "1GiB", ["--max-rate", "8MiB/s"]);
    const { gather, port } = await startGather([first, queued], psk, ["--max-rate", "8MiB/s"]);
    const evacuate = await startSgm([
      "evacuate", "--to", `127.0.0.1:${port}`, "--vm", `first=${first.source.qmpPath}`, "--vm", `queued=${queued.source.qmpPath}`,
      "--max-in-flight", "1", "--via", relay.address, "--all-relays", "--switchover", "precopy", "--keep-source", "--psk-file", psk, "--json",
    ], { SGM_TRACE: "1" });
    await relayAcknowledged(evacuate, relay.address, 2);
    relay.relay.proc.kill("SIGKILL");
    const [e, g] = await Promise.all([evacuate.result(), gather.result()]);
    expectExit(e, 0);
    expectExit(g, 0);
    const r = report<EvacuationReport>(e);
    expect(r.vms.map((v) => [v.name, v.ok, v.eviction?.sourceStreams])).toEqual([
      ["first", true, 2],
      ["queued", true, 1],
    ]);
    // the queued VM began after the relay was gone: everything it had went straight to the gather
    expect(r.vms[1]!.startedAfterMs).not.toBeNull();
    for (const pair of [first, queued]) await expectArrivedWhole(pair);
  }, 300_000);

  test("one relay set across destinations: what a finished run put on the relay, a later run bound elsewhere has it hold, not sent again", async () => {
    const [first, later] = await Promise.all([
      startPair(dir, "first", { memMiB: 96, seed: 351, rate: 2000 }),
      startPair(dir, "later", { memMiB: 64, seed: 352, rate: 2000 }),
    ]);
    const relay = await startRelay(psk);
    // a slow gather: most pages of first go through the relay
    const one = await startGather([first], psk, ["--max-rate", "8MiB/s"]);
    const laterPort = await freePort();
    const map = await writeMap("kept.map", [
      [first, one.port],
      [later, laterPort],
    ]);
    const evacuate = await startSgm(["evacuate", "--map", map, "--via", relay.address, "--all-relays", "--max-in-flight", "1", "--wait-gather", "600", "--keep-source", "--psk-file", psk, "--json"]);
    // first's run is over, and its gather has fetched and released every page it held on the relay
    expectExit(await one.gather.result(), 0);
    const two = await startGather([later], psk, [], laterPort);
    const [e, g2] = await Promise.all([evacuate.result(), two.gather.result()]);
    expectExit(e, 0);
    expectExit(g2, 0);
    const r = report<EvacuationReport>(e);
    const held = r.destinations.find((d) => d.to === `127.0.0.1:${laterPort}`)!.run!.placement;
    // the guests share content (test/guest/churn.c: ids 1 to 256 are the same bytes in every VM): the relay
    // kept first's copy for the evacuation, so later's run held it there and did not send it again (without
    // the keeping none would be there: first's gather had released it all)
    expect(held.sharedPages, JSON.stringify(held)).toBeGreaterThanOrEqual(64);
    // the evacuation dropped what the relay kept for it, and each gather released its own run's holds
    expect(e.stderr).toMatch(/relay 127\.0\.0\.1:\d+: dropped the \d+ pages it kept for this evacuation/);
    await expectRelayEmpty(relay);
    for (const pair of [first, later]) await expectArrivedWhole(pair);
  }, 300_000);
});
