// Scatter-Gather end to end through the compiled binary: relays absorb what
// a slow gather cannot take yet, so the source is evicted long before the
// destination holds every page.

import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import type { GatherReport } from "../core/gather/engine.ts";
import { queryMigrate } from "../core/qmp/migration.ts";
import type { ScatterReport } from "../core/scatter/engine.ts";
import { haltAndCompare, relayAcknowledged, report, startGather, startPair, startRelay, startScatter, type VmPair, writePsk } from "./harness/cluster.ts";
import { DIGEST_BYTES, digestPage, PAGE_BYTES } from "../core/dedup/digest.ts";
import { PeerConnection } from "../core/wire/connection.ts";
import { loadPsk } from "../core/wire/auth.ts";
import { maxPayload } from "../core/wire/messages.ts";
import { PUT_BATCH, PutBuilder, readAck, RelayFrame, RUN_ID_BYTES } from "../core/wire/relay-messages.ts";
import { killAll } from "./harness/processes.ts";
import { qemu10_0 } from "./harness/qemu-binaries.ts";
import { expectExit } from "./harness/sgm.ts";
import { freePort, makeTempDir, removeDir } from "./harness/tmp.ts";

let dir: string;
let psk: string;

beforeAll(async () => {
  dir = makeTempDir("scatter-gather");
  psk = await writePsk(dir);
});
afterEach(() => killAll());
afterAll(() => removeDir(dir));

/**
 * Another run, ready to put pages of its own on a relay (connected, its
 * PUTs built) so that fill() takes the relay's room at once: it sends them
 * all without waiting, and resolves with the bytes the relay took.
 */
async function prepareFiller(address: string, bytes: number): Promise<{ fill(): Promise<number> }> {
  const at = address.lastIndexOf(":");
  const conn = await PeerConnection.connect({ host: address.slice(0, at), port: Number(address.slice(at + 1)), psk: loadPsk(psk), role: "scatter", expectRole: "relay", maxPayload, timeoutMs: 5000 });
  const run = crypto.getRandomValues(new Uint8Array(RUN_ID_BYTES));
  const puts: Uint8Array[] = [];
  for (let seq = 0; seq * PUT_BATCH * PAGE_BYTES < bytes; seq++) {
    const builder = new PutBuilder();
    for (let n = 0; n < PUT_BATCH; n++) {
      // unique content, cheap to make: the run id, then the page's number
      const page = new Uint8Array(PAGE_BYTES);
      page.set(run);
      new DataView(page.buffer).setUint32(RUN_ID_BYTES, seq * PUT_BATCH + n);
      const digest = new Uint8Array(DIGEST_BYTES);
      digestPage(page, digest);
      builder.add(digest, 0, page);
    }
    puts.push(builder.take(run, seq, new Uint8Array(0)).payload);
  }
  return {
    fill: () =>
      new Promise<number>((resolve) => {
        let acks = 0;
        let held = 0;
        conn.onFrame((type, payload) => {
          if (type !== RelayFrame.ACK) return;
          held += readAck(payload).refused.filter((r) => !r).length * PAGE_BYTES;
          if (++acks === puts.length) {
            conn.close();
            resolve(held);
          }
        });
        for (const put of puts) conn.send(RelayFrame.PUT, put);
      }),
  };
}

async function provedEqual(pair: VmPair): Promise<void> {
  const { verified, comparison } = await haltAndCompare(pair, dir);
  expect(verified).toBe(true);
  expect(comparison.mismatched).toEqual([]);
}

describe("scatter-gather with relays", () => {
  test("two VMs, two relays (one on --prealloc), a slow gather: relays take most pages and give them back, memory equal; a relay service drains mid-run", async () => {
    // the gather takes 16 MiB/s, a small fraction of what any machine of this
    // kind reads from a source: the relays take most pages
    const pairs = await Promise.all([
      startPair(dir, "sg1", { memMiB: 64, seed: 201, rate: 2000 }),
      startPair(dir, "sg2", { memMiB: 64, seed: 202, rate: 2000 }),
    ]);
    // the second relay's memory is all resident before it listens: the pages it takes must come back intact from there too
    const [r1, r2] = await Promise.all([startRelay(psk, "1GiB", ["--http", "127.0.0.1:0"]), startRelay(psk, "1GiB", ["--prealloc"])]);
    expect(r2.relay.stderr()).toMatch(/^sgm: made 1\.0 GiB resident in /m);
    const metrics = (await r1.relay.waitStderr(/metrics on (http:\/\/\S+)\/metrics/))[1]!;
    const { gather, port } = await startGather(pairs, psk, ["--max-rate", "16MiB/s"]);
    const scatter = await startScatter(pairs, port, psk, ["--keep-source", "--all-relays", "--via", `${r1.address},${r2.address}`]);
    const s = await scatter.result();
    expectExit(s, 0);

    // evicted while the gather still fetches: the relay's metrics show what it holds, and SIGTERM lets the run finish
    const held = Number(/^sgm_relay_held_pages (\d+)$/m.exec(await (await fetch(`${metrics}/metrics`)).text())?.[1]);
    expect(held).toBeGreaterThan(1000);
    r1.relay.proc.kill("SIGTERM");
    await r1.relay.waitStderr(/draining: no new runs; waiting for the 1 held to finish/, 10_000);
    const g = await gather.result();
    expectExit(g, 0);
    const drained = await r1.relay.result();
    expectExit(drained, 0);
    expect(drained.stderr).toMatch(/drained: every run it held has finished/);
    // the gather released everything it fetched: the relays end empty
    expect(drained.stderr).toMatch(/relay stopped: held 0 B of/);
    r2.relay.proc.kill("SIGTERM");
    expect((await r2.relay.result()).stderr).toMatch(/relay stopped: held 0 B of/);

    const sr = report<ScatterReport>(s);
    const gr = report<GatherReport & { process: { bytesReceivedNatively: number; bytesSentNatively: number } }>(g);
    // a gather slower than its senders finds bytes waiting after each of Bun's reads: it reads them past Bun's socket
    if (process.env.SGM_NATIVE_RECEIVE !== "0") expect(gr.process.bytesReceivedNatively).toBeGreaterThan(1 << 20);
    // and writes the VMs' streams to their destination QEMUs on threads of its own
    if (process.env.SGM_NATIVE_SEND !== "0") expect(gr.process.bytesSentNatively).toBeGreaterThan(1 << 20);
    for (const name of ["sg1", "sg2"]) {
      const evicted = sr.vms.find((v) => v.name === name)!;
      const arrived = gr.vms.find((v) => v.name === name)!;
      expect(evicted.ok).toBe(true);
      expect(arrived.ok).toBe(true);
      // how much sooner the source is free than the destination has
      // everything is a figure for the eviction benchmark, not a test
      expect(arrived.downtimeMs).toBe(evicted.downtimeMs);
    }
    // pages went every way: straight to the gather, to both relays, and back from them
    expect(sr.placement.directPages).toBeGreaterThan(0);
    for (const relay of sr.relays) expect(relay.pages).toBeGreaterThan(1000);
    expect(gr.bytesFromRelays).toBeGreaterThan(held * 4096);
    for (const pair of pairs) await provedEqual(pair);
  }, 300_000);

  test("a relay another run fills mid-run refuses pages; they go to the other relay and the eviction does not wait for the gather", async () => {
    const pair = await startPair(dir, "full", { memMiB: 64, seed: 203, rate: 1000 });
    const [shared, other] = await Promise.all([startRelay(psk, "32MiB"), startRelay(psk, "256MiB")]);
    // the gather needs over 8 s for 64 MiB: a source held to its pace would wait as long
    const { gather, port } = await startGather([pair], psk, ["--max-rate", "8MiB/s"]);
    // told the source is barely faster than the gather, the plan reserves little: the run soon goes past its reservations
    const filler = await prepareFiller(shared.address, 32 << 20);
    const scatter = await startScatter([pair], port, psk, ["--keep-source", "--all-relays", "--source-rate", "9MiB/s", "--via", `${shared.address},${other.address}`]);
    // printed once its reservations are made: from here, another run takes only what this one did not reserve
    await scatter.waitStderr(/relays: /);
    const taken = await filler.fill();
    let gatherDone = false;
    const g = gather.result().then((r) => {
      gatherDone = true;
      return r;
    });
    const s = await scatter.result();
    expectExit(s, 0);
    expect(gatherDone).toBe(false);
    expectExit((await g), 0);
    const sr = report<ScatterReport>(s);
    const relay = (address: string) => sr.relays.find((r) => r.address === address)!;
    expect(taken).toBeGreaterThan(16 << 20);
    expect(relay(shared.address).refusedPages).toBeGreaterThan(0);
    expect(sr.placement.replacedPages).toBe(relay(shared.address).refusedPages);
    expect(relay(other.address).pages).toBeGreaterThan(5000);
    await provedEqual(pair);
  }, 180_000);

  test("relays share the pages by their room: twice the room, about twice the pages (one named in --via-file)", async () => {
    const pair = await startPair(dir, "share", { memMiB: 128, seed: 208, rate: 1000 });
    const [small, large] = await Promise.all([startRelay(psk, "512MiB"), startRelay(psk, "1GiB")]);
    const viaFile = join(dir, "relays");
    await Bun.write(viaFile, `# the fleet's relays\n\n${large.address}   # twice the room\n`);
    const { gather, port } = await startGather([pair], psk, ["--max-rate", "16MiB/s"]);
    const scatter = await startScatter([pair], port, psk, ["--keep-source", "--all-relays", "--via", small.address, "--via-file", viaFile]);
    const s = await scatter.result();
    expectExit(s, 0);
    expectExit((await gather.result()), 0);
    expect(s.stderr).toContain(`${large.address} (1.0 GiB free, `);
    const sr = report<ScatterReport>(s);
    const relay = (address: string) => sr.relays.find((r) => r.address === address)!;
    const [l, m] = [relay(large.address), relay(small.address)];
    expect(l.pages + m.pages).toBeGreaterThan(10_000);
    // the weights give the larger relay 2/3 of the pages (an even split gives
    // 1/2), within 10%. A relay that lags its acknowledgements is passed over
    // for the next, by design, which moves what each takes by the machine's
    // load: rankedPages counts what room alone gave it, passedPages what lag
    // moved, and pages what it took.
    const share = l.rankedPages / (l.rankedPages + m.rankedPages);
    expect(share).toBeGreaterThan((2 / 3) * 0.9);
    expect(share).toBeLessThan((2 / 3) * 1.1);
    // what each took: what room gave it and lag did not take, and at most
    // what lag passed on from the other (neither refused a page nor went)
    for (const [r, other] of [[l, m], [m, l]] as const) {
      expect([r.refusedPages, r.lost]).toEqual([0, null]);
      expect(r.pages).toBeGreaterThanOrEqual(r.rankedPages - r.passedPages);
      expect(r.pages).toBeLessThanOrEqual(r.rankedPages - r.passedPages + other.passedPages);
    }
    await provedEqual(pair);
  }, 180_000);

  test("with --replicas 2, the gather finishes from one relay when the other goes away", async () => {
    const pair = await startPair(dir, "twice", { memMiB: 64, seed: 207, rate: 1000 });
    const [r1, r2] = await Promise.all([startRelay(psk), startRelay(psk)]);
    const { gather, port } = await startGather([pair], psk, ["--max-rate", "16MiB/s"]);
    const s = await (await startScatter([pair], port, psk, ["--keep-source", "--all-relays", "--via", `${r1.address},${r2.address}`, "--replicas", "2"])).result();
    expectExit(s, 0);
    const sr = report<ScatterReport>(s);
    // every relayed page is on both relays
    expect(sr.relays[0]!.pages).toBe(sr.placement.relayedPages);
    expect(sr.relays[1]!.pages).toBe(sr.placement.relayedPages);
    // the source is evicted; the slow gather still has pages to fetch when a relay dies
    r1.relay.proc.kill("SIGKILL");
    const g = await gather.result();
    expectExit(g, 0);
    const gr = report<GatherReport>(g);
    // the gather asks the first relay holding a page: the second served only once the first was gone
    const fetched = (address: string) => gr.relays.find((r) => r.address === address)!.pagesFetched;
    expect(fetched(r2.address)).toBeGreaterThan(0);
    await provedEqual(pair);
  }, 180_000);

  test("with --replicas 1, a relay killed before eviction: the source streams again, and the VM arrives intact", async () => {
    const pair = await startPair(dir, "again", { memMiB: 64, seed: 208, rate: 1000 });
    // gather and relay both slow: the source cannot be evicted before some
    // 16 MiB of its 64 have gone, and the relay is killed at 2 MiB
    const relay = await startRelay(psk, "1GiB", ["--max-rate", "8MiB/s"]);
    const { gather, port } = await startGather([pair], psk, ["--max-rate", "8MiB/s"]);
    const scatter = await startScatter([pair], port, psk, ["--keep-source", "--all-relays", "--via", relay.address, "--replicas", "1"], { SGM_TRACE: "1" });
    await relayAcknowledged(scatter, relay.address, 2);
    relay.relay.proc.kill("SIGKILL");
    const [s, g] = await Promise.all([scatter.result(), gather.result()]);
    expectExit(g, 0);
    expectExit(s, 0);
    const sr = report<ScatterReport>(s);
    expect(sr.relays[0]!.lost).not.toBeNull();
    expect(sr.vms[0]!.sourceStreams).toBe(2);
    expect(s.stderr).toMatch(new RegExp(`${pair.name}: relay ${relay.address}: .+, with the only copy of \\d+ contents; the source streams its memory again \\(attempt 2\\)`));
    await provedEqual(pair);
  }, 180_000);

  test.each(["7.2", "10.0"])("with --replicas 1, a relay killed after the source switched to postcopy: the source pauses, resumes and sends those pages again, the VM intact (QEMU %s)", async (qemu) => {
    const binary = qemu === "10.0" ? await qemu10_0() : undefined;
    const pair = await startPair(dir, `resumed${qemu.replace(".", "")}`, { memMiB: 64, seed: 209, rate: 1000, sourceBinary: binary, destinationBinary: binary });
    const relay = await startRelay(psk, "1GiB", ["--max-rate", "8MiB/s"]);
    const { gather, port } = await startGather([pair], psk, ["--max-rate", "8MiB/s"]);
    // postcopy at once: every page the relay takes comes after the switch
    const flags = ["--keep-source", "--all-relays", "--via", relay.address, "--replicas", "1", "--switchover", "postcopy", "--postcopy-after-pass", "0"];
    const scatter = await startScatter([pair], port, psk, flags, { SGM_TRACE: "1" });
    await relayAcknowledged(scatter, relay.address, 2);
    relay.relay.proc.kill("SIGKILL");
    const [s, g] = await Promise.all([scatter.result(), gather.result()]);
    expectExit(g, 0);
    expectExit(s, 0);
    const vm = report<ScatterReport>(s).vms[0]!;
    expect([vm.switchover, vm.sourceStreams, vm.sourceResumes]).toEqual(["postcopy", 1, 1]);
    expect(s.stderr).toContain(`${pair.name}: relay ${relay.address}`);
    expect(s.stderr).toContain("the source's postcopy pauses and resumes to send those pages again");
    await provedEqual(pair);
  }, 180_000);

  test("a gather that starts after the scatter is waited for", async () => {
    const pair = await startPair(dir, "late", { memMiB: 64, seed: 204, rate: 500 });
    const port = await freePort();
    const scatter = await startScatter([pair], port, psk, ["--keep-source", "--wait-gather", "20"]);
    await scatter.waitStderr(/waiting for the gather at 127\.0\.0\.1:\d+/);
    await Bun.sleep(1000);
    const { gather } = await startGather([pair], psk, [], port);
    const [s, g] = [await scatter.result(), await gather.result()];
    expectExit(s, 0);
    expectExit(g, 0);
    await provedEqual(pair);
  }, 120_000);

  test("an unreachable relay is left out when enough others remain", async () => {
    const pair = await startPair(dir, "oneup", { memMiB: 64, seed: 205, rate: 500 });
    const live = await startRelay(psk);
    const dead = `127.0.0.1:${await freePort()}`;
    const { gather, port } = await startGather([pair], psk, ["--max-rate", "32MiB/s"]);
    const s = await (await startScatter([pair], port, psk, ["--keep-source", "--all-relays", "--via", `${dead},${live.address}`])).result();
    const g = await gather.result();
    expectExit(s, 0);
    expectExit(g, 0);
    expect(s.stderr).toContain(`sgm: relay ${dead} left out: ${dead}: connection refused`);
    expect(report<ScatterReport>(s).relays.map((r) => r.address)).toEqual([live.address]);
    await provedEqual(pair);
  }, 120_000);

  test("with no relay reachable for --replicas, nothing moves and the VM keeps running", async () => {
    const pair = await startPair(dir, "nonewup", { memMiB: 32, seed: 206 });
    const dead = `127.0.0.1:${await freePort()}`;
    const { port } = await startGather([pair], psk);
    const s = await (await startScatter([pair], port, psk, ["--via", dead])).result();
    expectExit(s, 69);
    expect(s.stderr).toMatch(/sgm: error: only 0 of 1 relays reachable, fewer than --replicas 1\n$/);
    expect((await queryMigrate(pair.source.qmp)).status ?? "none").toBe("none");
    expect(await pair.source.status()).toBe("running");
  }, 60_000);
});
