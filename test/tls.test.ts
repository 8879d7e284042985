// TLS under the pre-shared key, through the compiled binary and real QEMU:
// a VM evicted through a relay with every connection on TLS arrives whole;
// a gather whose certificate the CA did not sign is refused and the VM runs
// on at the source; TLS flags given in part are a usage error.

import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import type { ScatterReport } from "../core/scatter/engine.ts";
import { makeTestCertificates, type TestCertificates } from "./harness/certificates.ts";
import { haltAndCompare, report, startGather, startPair, startRelay, startScatter, writePsk } from "./harness/cluster.ts";
import { killAll } from "./harness/processes.ts";
import { expectExit, runSgm } from "./harness/sgm.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";

let dir: string;
let psk: string;
let certs: TestCertificates;

beforeAll(async () => {
  dir = makeTempDir("tls");
  psk = await writePsk(dir);
  certs = await makeTestCertificates(dir);
});
afterEach(() => killAll());
afterAll(() => removeDir(dir));

function tlsFlags(name: "a" | "b" | "rogue"): string[] {
  const { cert, key } = certs.peer(name);
  return ["--tls-cert", cert, "--tls-key", key, "--tls-ca", certs.ca];
}

describe("TLS", () => {
  test("scatter, relay and gather all on TLS: the VM arrives with every page equal", async () => {
    const pair = await startPair(dir, "tls1", { memMiB: 64, seed: 71, rate: 2000 });
    const relay = await startRelay(psk, "1GiB", tlsFlags("a"));
    // a slow gather, so that the relay takes pages and the gather fetches them over TLS too
    const { gather, port } = await startGather([pair], psk, ["--max-rate", "16MiB/s", ...tlsFlags("a")]);
    const scatter = await startScatter([pair], port, psk, ["--keep-source", "--all-relays", "--via", relay.address, ...tlsFlags("b")]);
    const [s, g] = await Promise.all([scatter.result(), gather.result()]);
    expectExit(s, 0);
    expectExit(g, 0);
    expect(report<ScatterReport>(s).placement.relayedPages).toBeGreaterThan(0);
    const { verified, comparison } = await haltAndCompare(pair, dir);
    expect(verified).toBe(true);
    expect(comparison.mismatched).toEqual([]);
  }, 300_000);

  test("a gather whose certificate the CA did not sign is refused: nothing moves, the VM runs on at the source", async () => {
    const pair = await startPair(dir, "tls2", { memMiB: 64, seed: 72, rate: 2000 });
    const { gather, port } = await startGather([pair], psk, tlsFlags("rogue"));
    const s = await (await startScatter([pair], port, psk, ["--wait-gather", "0", ...tlsFlags("b")])).result();
    expectExit(s, 69);
    expect(s.stderr).toMatch(/TLS refused/);
    expect(await pair.source.keepsRunning()).toBe(true);
    gather.proc.kill("SIGINT");
    await gather.result();
  }, 120_000);

  test("TLS flags given in part are a usage error that names what is missing", async () => {
    const r = await runSgm(["relay", "--listen", "127.0.0.1:0", "--capacity", "64MiB", "--psk-file", psk, "--tls-cert", certs.peer("a").cert]);
    expectExit(r, 2);
    expect(r.stderr).toMatch(/--tls-cert given without --tls-key, --tls-ca: TLS needs all three/);
  });
});
