// Busy guests: a source that switches to postcopy sends each remaining page
// once, so a guest dirtying memory faster than any link still leaves.

import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import type { GatherReport } from "../core/gather/engine.ts";
import { queryMigrate } from "../core/qmp/migration.ts";
import type { ScatterReport } from "../core/scatter/engine.ts";
import { haltAndCompare, report, startGather, startPair, startScatter, type VmPair, writePsk } from "./harness/cluster.ts";
import { killAll } from "./harness/processes.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";

let dir: string;
let psk: string;

beforeAll(async () => {
  dir = makeTempDir("postcopy");
  psk = await writePsk(dir);
});
afterEach(() => killAll());
afterAll(() => removeDir(dir));

/** A guest that dirties a million pages a second: every page, 15 times a second. */
const BUSY = 1_000_000;

async function provedEqual(pair: VmPair): Promise<void> {
  const { verified, comparison } = await haltAndCompare(pair, dir);
  expect(verified).toBe(true);
  expect(comparison.mismatched).toEqual([]);
}

describe("postcopy switchover", () => {
  test("a guest too busy for precopy never converges into scatter, and leaves in postcopy", async () => {
    // precopy: after 8 s the source still iterates; stopping it leaves the VM running
    const stuck = await startPair(dir, "stuck", { memMiB: 256, seed: 301, rate: BUSY });
    const g1 = await startGather([stuck], psk);
    const precopy = await startScatter([stuck], g1.port, psk, ["--switchover", "precopy"]);
    await Bun.sleep(8000);
    const info = await queryMigrate(stuck.source.qmp);
    expect(info.status).toBe("active");
    expect(info.ram!["dirty-sync-count"]).toBeGreaterThanOrEqual(4);
    expect(info.ram!.transferred).toBeGreaterThan(2 * 256 * 1024 * 1024);
    precopy.proc.kill("SIGINT");
    expect((await precopy.result()).code).toBe(130);
    expect(await stuck.source.status()).toBe("running");
    await killAll();

    // postcopy: the same kind of guest is evicted and arrives whole
    const pair = await startPair(dir, "busy", { memMiB: 256, seed: 302, rate: BUSY });
    const { gather, port } = await startGather([pair], psk);
    const s = await (await startScatter([pair], port, psk, ["--keep-source", "--switchover", "postcopy", "--postcopy-after-pass", "1"])).result();
    const g = await gather.result();
    expect(s.code).toBe(0);
    expect(g.code).toBe(0);
    const sr = report<ScatterReport>(s).vms[0]!;
    const gr = report<GatherReport>(g).vms[0]!;
    expect(sr.switchover).toBe("postcopy");
    expect(sr.evictionMs).toBeGreaterThan(0);
    expect(sr.downtimeMs).toBeGreaterThan(0);
    expect(gr.downtimeMs).toBe(sr.downtimeMs);
    expect(gr.totalMs).toBeGreaterThanOrEqual(sr.evictionMs!);
    // the destination waited for pages the source still had: they went back to it
    expect(gr.pages.requestedFromSource).toBeGreaterThan(0);
    expect(sr.pages.requestedFromSource).toBeGreaterThan(0);
    await provedEqual(pair);
  }, 240_000);

  test("pages the destination touches right after switchover come from the source, and the guest runs on", async () => {
    const pair = await startPair(dir, "touch", { memMiB: 256, seed: 303, rate: 20_000 });
    const { gather, port } = await startGather([pair], psk);
    const s = await (await startScatter([pair], port, psk, ["--keep-source", "--switchover", "postcopy", "--postcopy-after-pass", "0"])).result();
    const g = await gather.result();
    expect(s.code).toBe(0);
    expect(g.code).toBe(0);
    const sr = report<ScatterReport>(s).vms[0]!;
    const gr = report<GatherReport>(g).vms[0]!;
    // switched at once: the source had sent little, so most pages were pending
    expect(sr.pages.pendingPages).toBeGreaterThan(gr.pages.total / 2);
    expect(gr.pages.requestedFromSource).toBeGreaterThan(0);
    expect(gr.pages.requestedPagesServed).toBeGreaterThanOrEqual(gr.pages.requestedFromSource);
    expect(await pair.destination.keepsRunning()).toBe(true);
    await provedEqual(pair);
  }, 120_000);
});
