// A gather that dies after switchover: the destination QEMU pauses its
// postcopy, and a gather restarted with --resume finishes the migration
// from the state the first one saved and from the relays.

import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import type { GatherReport } from "../core/gather/engine.ts";
import type { ScatterReport } from "../core/scatter/engine.ts";
import { haltAndCompare, report, resumeGather, startGather, startPair, startRelay, startScatter, type VmPair, writePsk } from "./harness/cluster.ts";
import { killAll } from "./harness/processes.ts";
import { qemu10_0 } from "./harness/qemu-binaries.ts";
import type { TestVm } from "./harness/qemu.ts";
import { expectExit, startSgm } from "./harness/sgm.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";

let dir: string;
let psk: string;

beforeAll(async () => {
  dir = makeTempDir("resume");
  psk = await writePsk(dir);
});
afterEach(() => killAll());
afterAll(() => removeDir(dir));

async function migrationStatus(vm: TestVm): Promise<string> {
  const r = await vm.qmp.execute<{ status?: string }>("query-migrate");
  return r.status ?? "none";
}

/** What the gather keeps for the VM in its state dir: its state, and its monitor holder's socket. */
function savedFiles(pair: VmPair): string[] {
  const stateDir = join(dir, "gather-state");
  return readdirSync(stateDir)
    .filter((f) => f.startsWith(`${pair.name}-`))
    .map((f) => f.slice(f.lastIndexOf(".")))
    .sort();
}

async function holderGone(pair: VmPair): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (savedFiles(pair).includes(".qmp")) {
    if (Date.now() > deadline) throw new Error(`${pair.name}: the monitor holder still listens 10 s after the migration completed`);
    await Bun.sleep(20);
  }
}

/**
 * The guest's own IDT, 256 gates: the guest loads it just after it says it
 * has filled its memory, so a slow machine may still show the loader's.
 */
async function guestIdt(vm: TestVm): Promise<{ base: number; limit: number }> {
  const deadline = Date.now() + 30_000;
  let last = "";
  while (Date.now() < deadline) {
    const registers = await vm.qmp.execute<string>("human-monitor-command", { "command-line": "info registers" });
    const idt = /IDT=\s*([0-9a-f]+) ([0-9a-f]+)/i.exec(registers);
    if (!idt) throw new Error(`${vm.name}: no IDT in 'info registers': ${registers.slice(0, 400)}`);
    last = idt[0];
    const limit = parseInt(idt[2]!, 16);
    if (limit === 256 * 8 - 1) return { base: parseInt(idt[1]!, 16), limit };
    await Bun.sleep(20);
  }
  throw new Error(`${vm.name}: the guest had not loaded its own IDT 30 s after it filled its memory (last '${last}')`);
}

/** Until a QMP command goes unanswered for `quietMs`: a thread holding QEMU's big lock waits for a page. */
async function waitForBlockedMainLoop(vm: TestVm, quietMs: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const answered = await Promise.race([vm.qmp.execute("query-status").then(() => true), Bun.sleep(quietMs).then(() => false)]);
    if (!answered) return;
  }
  // what the destination was doing instead, for the failure to name
  const registers = await vm.qmp.execute<string>("human-monitor-command", { "command-line": "info registers" });
  const cpu = [/EIP=\S+/, /EFL=\S+/, /IDT=\s*\S+ \S+/, /HLT=\S+/].map((r) => r.exec(registers)?.[0] ?? `${r.source}?`).join(" ");
  const status = `${(await vm.qmp.execute<{ status: string }>("query-status")).status}, migration ${await migrationStatus(vm)}`;
  throw new Error(`${vm.name}: QEMU's main loop still answered ${timeoutMs} ms after switchover: no interrupt came to wait for the withheld IDT (${status}; ${cpu})`);
}

async function waitForStatus(vm: TestVm, wanted: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = "";
  while (Date.now() < deadline) {
    last = await migrationStatus(vm);
    if (last === wanted) return;
    await Bun.sleep(50);
  }
  throw new Error(`${vm.name}: destination migration not '${wanted}' within ${timeoutMs} ms (last '${last}')`);
}

describe("gather --resume", () => {
  const cases = [
    { qemu: "10.0", switchover: ["--switchover", "precopy"], seed: 401 },
    { qemu: "7.2", switchover: ["--switchover", "postcopy", "--postcopy-after-pass", "0"], seed: 403 },
  ];
  test.each(cases)("the gather killed once the VM runs at the destination; a new one with --resume completes it, memory equal page for page (QEMU $qemu, $switchover)", async ({ qemu, switchover, seed }) => {
    const binary = qemu === "10.0" ? await qemu10_0() : undefined;
    const pair = await startPair(dir, `phoenix${seed}`, { memMiB: 128, seed, rate: 2000, sourceBinary: binary, destinationBinary: binary });
    const relay = await startRelay(psk, "1GiB", ["--json"]);
    const address = relay.address;
    // the gather takes pages slowly, so most of the VM is still on the relay when it dies
    const flags = ["--max-rate", "4MiB/s"];
    const first = await startGather([pair], psk, flags);
    const s = await (await startScatter([pair], first.port, psk, ["--keep-source", "--via", address, "--all-relays", ...switchover])).result();
    expectExit(s, 0);
    const sr = report<ScatterReport>(s).vms[0]!;
    expect(sr.source).toBe("paused");
    expect(String(sr.switchover)).toBe(switchover[1]!);
    expect(first.gather.stderr()).toMatch(new RegExp(`${pair.name}: state for --resume saved to \\S+ \\([\\d.]+ [KMG]?i?B; taken in \\d+ ms, written in \\d+ ms\\)`));
    expect(await migrationStatus(pair.destination)).toBe("postcopy-active");
    expect(savedFiles(pair)).toEqual([".qmp", ".resume"]);
    // killed before this, the gather would leave the relay the old versions of pages the scatter's end unpins (README)
    await first.gather.waitStderr(/scatter \S+ left/, 10_000);

    first.gather.proc.kill("SIGKILL");
    await first.gather.proc.exited;
    // not asked over QMP now: with no gather, a page QEMU's main loop waits for never comes

    // the same flags but the rate: nothing need hold the new gather back
    const again = await resumeGather([pair], psk, first.port);
    const g = await again.result();
    expectExit(g, 0);
    const gr = report<GatherReport>(g).vms[0]!;
    expect(gr.ok).toBe(true);
    // the resumed gather had pages left to deliver, and fetched them from the relay
    expect(gr.pages.deliveredPages).toBeGreaterThan(0);
    expect(report<GatherReport>(g).bytesFromRelays).toBeGreaterThan(0);
    expect(g.stderr).toContain(`${pair.name}: resuming from `);
    expect(await migrationStatus(pair.destination)).toBe("completed");
    // the state goes with the migration's end, and so does the monitor's holder
    await holderGone(pair);
    expect(savedFiles(pair)).toEqual([]);
    // what the relay held for the run went with the pages it gave (SIGINT: a drain would wait for what it still holds)
    relay.relay.proc.kill("SIGINT");
    expect(report<{ used: number; runs: number }>(await relay.relay.result())).toMatchObject({ used: 0, runs: 0 });
    const { verified, comparison } = await haltAndCompare(pair, dir);
    expect(verified).toBe(true);
    expect(comparison.mismatched).toEqual([]);
  }, 240_000);

  test.each(["7.2", "10.0"])("the gather killed while QEMU's main loop waits for a page (an interrupt reading the guest's IDT under the big lock): --resume recovers out of band through the monitor holder, memory equal (QEMU %s)", async (qemu) => {
    const binary = qemu === "10.0" ? await qemu10_0() : undefined;
    const pair = await startPair(dir, `blocked${qemu.replace(".", "")}`, { memMiB: 64, seed: 406, rate: 2000, sourceBinary: binary, destinationBinary: binary });
    const idt = await guestIdt(pair.source);
    // the first gather never gives the destination the guest's IDT: TCG reads it under the big lock (cpu_handle_interrupt)
    const env = { SGM_TEST_FAULT: "gather-withhold", SGM_TEST_FAULT_AT: `pc.ram:${idt.base}:${idt.limit + 1}` };
    const first = await startGather([pair], psk, [], undefined, env);
    const s = await (await startScatter([pair], first.port, psk, ["--keep-source", "--switchover", "postcopy", "--postcopy-after-pass", "0"])).result();
    expectExit(s, 0);
    await waitForBlockedMainLoop(pair.destination, 3000, 60_000);
    first.gather.proc.kill("SIGKILL");
    await first.gather.proc.exited;
    // a new connection to QEMU's own monitor could not even negotiate: only the holder's, negotiated before, runs migrate-recover
    const g = await (await resumeGather([pair], psk, first.port)).result();
    expectExit(g, 0);
    expect(report<GatherReport>(g).vms[0]!.ok).toBe(true);
    expect(await migrationStatus(pair.destination)).toBe("completed");
    await holderGone(pair);
    const { verified, comparison } = await haltAndCompare(pair, dir);
    expect(verified).toBe(true);
    expect(comparison.mismatched).toEqual([]);
  }, 180_000);

  test.each(["7.2", "10.0"])("postcopy, the gather killed before the source's last page: the scatter drops the source's stream only where QEMU pauses its postcopy, and the VM runs nowhere but the destination (QEMU %s)", async (qemu) => {
    const binary = qemu === "10.0" ? await qemu10_0() : undefined;
    const pair = await startPair(dir, `halfway${qemu.replace(".", "")}`, { memMiB: 128, seed: 405, rate: 2000, sourceBinary: binary, destinationBinary: binary });
    // the gather takes pages slowly: the source still has most of the VM to send when it dies
    const gather = await startGather([pair], psk, ["--max-rate", "4MiB/s"]);
    const scatter = await startScatter([pair], gather.port, psk, ["--keep-source", "--switchover", "postcopy", "--postcopy-after-pass", "0"]);
    await waitForStatus(pair.destination, "postcopy-active", 60_000);
    gather.gather.proc.kill("SIGKILL");
    const s = await scatter.result();
    expect(s.code).not.toBe(0);
    const vm = report<ScatterReport>(s).vms[0]!;
    expect([vm.ok, vm.switchover, vm.source]).toEqual([false, "postcopy", "paused"]);
    expect(s.stderr).toContain(`${pair.name}: the source had switched to postcopy and cannot resume the VM; it stays paused there (migration postcopy-paused)`);
    // a failed migration would have started the VM here again
    expect(await migrationStatus(pair.source)).toBe("postcopy-paused");
    expect(await pair.source.status()).not.toBe("running");
  }, 120_000);

  test("two VMs of one run sharing content, --replicas 2: the gather and one relay killed after eviction; --resume finishes both from the other relay, memory equal", async () => {
    const pairs = await Promise.all([0, 1].map((v) => startPair(dir, `twin${v}`, { memMiB: 64, seed: 410 + v, rate: 1000, churn: 4 })));
    const relays = await Promise.all([0, 1].map(() => startRelay(psk)));
    const first = await startGather(pairs, psk, ["--max-rate", "4MiB/s"]);
    const via = ["--via", relays.map((r) => r.address).join(","), "--all-relays", "--replicas", "2"];
    const s = await (await startScatter(pairs, first.port, psk, ["--keep-source", ...via])).result();
    expectExit(s, 0);
    expect(report<ScatterReport>(s).vms.map((v) => v.source)).toEqual(["paused", "paused"]);
    first.gather.proc.kill("SIGKILL");
    relays[0]!.relay.proc.kill("SIGKILL");
    await first.gather.proc.exited;
    const g = await (await resumeGather(pairs, psk, first.port)).result();
    expectExit(g, 0);
    expect(g.stderr).toContain(`relay ${relays[0]!.address} does not answer`);
    const gr = report<GatherReport>(g);
    expect(gr.vms.map((v) => v.ok)).toEqual([true, true]);
    expect(gr.relays.find((r) => r.address === relays[1]!.address)!.pagesFetched).toBeGreaterThan(0);
    for (const pair of pairs) {
      const { verified, comparison } = await haltAndCompare(pair, dir);
      expect(verified).toBe(true);
      expect(comparison.mismatched).toEqual([]);
    }
  }, 240_000);

  test("--replicas 1 and the relay lost after eviction: the gather names the VM, the relay and the pages lost; the destination QEMU keeps the VM", async () => {
    const pair = await startPair(dir, "orphan", { memMiB: 128, seed: 404, rate: 2000 });
    const relay = await startRelay(psk);
    const first = await startGather([pair], psk, ["--max-rate", "4MiB/s"]);
    const s = await (await startScatter([pair], first.port, psk, ["--keep-source", "--via", relay.address, "--all-relays"])).result();
    expectExit(s, 0);
    expect(report<ScatterReport>(s).vms[0]!.evictionMs).toBeGreaterThan(0);
    relay.relay.proc.kill("SIGKILL");
    const g = await first.gather.result();
    expectExit(g, 69);
    const gr = report<GatherReport>(g).vms[0]!;
    expect(gr.ok).toBe(false);
    expect(gr.error).toMatch(
      new RegExp(`^VM orphan: relay ${relay.address} went away \\(.+\\) with the only copy of [1-9]\\d* pages its destination still lacks; the VM runs at the destination, paused \\(postcopy-paused\\) until they come, and cannot complete without them$`),
    );
    // QEMU keeps the VM for pages that may yet come; it is not asked over QMP: with pages
    // that never come, its main loop may itself come to wait on one (seen once here)
    expect(pair.destination.proc.exitCode).toBeNull();
  }, 120_000);

  test("without a saved state, --resume refuses in one line and leaves the destination as it is", async () => {
    const pair = await startPair(dir, "nostate", { memMiB: 32, seed: 402 });
    const r = await (
      await startSgm(["gather", "--listen", "127.0.0.1:0", "--vm", `nostate=${pair.destination.qmpPath}`, "--psk-file", psk, "--state-dir", join(dir, "empty"), "--resume", "--json"])
    ).result();
    expectExit(r, 69);
    expect(report<GatherReport>(r).vms).toMatchObject([{ name: "nostate", ok: false, exitCode: 69 }]);
    expect(r.stderr).toMatch(/no saved state at .*nostate-[0-9a-f]{12}\.resume: the gather stopped before this VM ran at the destination, or its migration ended/);
    expect(await pair.destination.status()).toBe("inmigrate");
    expect(existsSync(join(dir, "empty"))).toBe(true);
  }, 60_000);
});
