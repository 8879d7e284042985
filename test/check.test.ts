// sgm check, through the compiled binary against real QEMU: one verdict per
// check, exit 0 only if an eviction would start, and nothing touched.

import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { queryMigrate } from "../core/qmp/migration.ts";
import type { CheckReport } from "../core/scatter/preflight.ts";
import { report, startGather, startPair, startRelay, type VmPair, writePsk } from "./harness/cluster.ts";
import { killAll } from "./harness/processes.ts";
import { expectExit, runSgm } from "./harness/sgm.ts";
import { freePort, makeTempDir, removeDir } from "./harness/tmp.ts";

let dir: string;
let psk: string;

beforeAll(async () => {
  dir = makeTempDir("check");
  psk = await writePsk(dir);
});
afterEach(() => killAll());
afterAll(() => removeDir(dir));

function check(pairs: VmPair[], port: number, extra: string[] = [], key = psk) {
  return runSgm(["check", "--to", `127.0.0.1:${port}`, ...pairs.flatMap((p) => ["--vm", `${p.name}=${p.source.qmpPath}`]), "--psk-file", key, "--json", ...extra]);
}

const verdicts = (r: CheckReport) => Object.fromEntries(r.checks.map((c) => [c.check.replace(/127\.0\.0\.1:\d+/, "ADDR"), c.verdict]));

async function untouched(pair: VmPair): Promise<void> {
  expect((await queryMigrate(pair.source.qmp)).status ?? "none").toBe("none");
  expect(await pair.source.status()).toBe("running");
}

describe("sgm check", () => {
  test("every check passes: exit 0, one line each, nothing touched", async () => {
    const pair = await startPair(dir, "good", { memMiB: 32, seed: 401 });
    const relay = await startRelay(psk, "1GiB", ["--json"]);
    const { gather, port } = await startGather([pair], psk, ["--max-rate", "8MiB/s"]);
    const r = await check([pair], port, ["--via", relay.address]);
    expectExit(r, 0);
    const c = report<CheckReport>(r);
    expect(verdicts(c)).toEqual({ "source good": "ok", "gather ADDR": "ok", "destination good": "ok", "relay ADDR": "ok", plan: "ok" });
    expect(r.stderr).toMatch(/^sgm: ok {4}destination good: QEMU [\d.]+, pc-i440fx-[\d.]+: waits with -incoming defer and can do postcopy \(userfaultfd\)$/m);
    expect(r.stderr).toMatch(/^sgm: an eviction would start$/m);
    await untouched(pair);
    expect(gather.proc.exitCode).toBeNull();
    relay.relay.proc.kill("SIGTERM");
    expect(report<{ peakUsed: number; runs: number }>(await relay.relay.result())).toMatchObject({ peakUsed: 0, runs: 0 });
  }, 60_000);

  test("each failure is named, all are listed, and the exit code is the first one's", async () => {
    const pair = await startPair(dir, "fine", { memMiB: 32, seed: 402 });
    const stray = await startPair(dir, "stray", { memMiB: 32, seed: 403 });
    await stray.source.qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "xbzrle", state: true }] });
    const unserved = await startPair(dir, "unserved", { memMiB: 32, seed: 404 });
    const dead = `127.0.0.1:${await freePort()}`;
    const { port } = await startGather([pair, stray], psk);
    const r = await check([pair, stray, unserved], port, ["--via", dead]);
    expectExit(r, 2);
    const c = report<CheckReport>(r);
    expect(verdicts(c)).toEqual({
      "source fine": "ok",
      "source stray": "fail",
      "source unserved": "ok",
      "gather ADDR": "ok",
      "destination fine": "ok",
      "destination unserved": "fail",
      "relay ADDR": "warn",
      plan: "fail",
    });
    const detail = (what: string) => c.checks.find((x) => x.check === what)!.detail;
    expect(detail("source stray")).toBe("VM stray: migration capability 'xbzrle' is on (XBZRLE-encoded pages); sgm needs it off");
    expect(detail("destination unserved")).toBe("no destination for VM unserved here (not a --vm of this gather)");
    expect(detail(`relay ${dead}`)).toMatch(/connection refused/);
    expect(detail("plan")).toBe("only 0 of 1 relays reachable, fewer than --replicas 1");
    for (const p of [pair, stray, unserved]) await untouched(p);
  }, 60_000);

  test("a gather that is not there, or refuses the key, fails its check with 69", async () => {
    const pair = await startPair(dir, "lonely", { memMiB: 32, seed: 405 });
    const nobody = await check([pair], await freePort(), ["--wait-gather", "0"]);
    expectExit(nobody, 69);
    expect(verdicts(report<CheckReport>(nobody))).toEqual({ "source lonely": "ok", "gather ADDR": "fail" });

    const { port } = await startGather([pair], psk);
    const keyDir = join(dir, "wrong-key");
    mkdirSync(keyDir);
    const wrongKey = await writePsk(keyDir, "a different key of enough length");
    const refused = await check([pair], port, [], wrongKey);
    expectExit(refused, 69);
    expect(report<CheckReport>(refused).checks.find((x) => x.check.startsWith("gather"))!.detail).toMatch(/authentication failed/);
    await untouched(pair);
  }, 60_000);

  test("relays too small for what will not go direct: the plan fails with 78", async () => {
    const pair = await startPair(dir, "big", { memMiB: 128, seed: 406 });
    const small = await startRelay(psk, "16MiB");
    const { port } = await startGather([pair], psk, ["--max-rate", "5MiB/s"]);
    const r = await check([pair], port, ["--via", small.address, "--source-rate", "100MiB/s"]);
    expectExit(r, 78);
    const plan = report<CheckReport>(r).checks.find((x) => x.check === "plan")!;
    expect(plan).toMatchObject({ verdict: "fail", detail: expect.stringMatching(/^the relays can hold 16\.0 MiB of the /) });
    await untouched(pair);
  }, 60_000);
});
