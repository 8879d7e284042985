// make bench's smoke test: one repetition of the default case (one busy
// Linux guest) on the bed of hosts, through the compiled sgm and real QEMU,
// by every kind of method: QEMU's two, sgm with no relay, with three, and
// with three without dedup (one and two relays differ from three only in
// count, and would add half a minute to make test). It proves the
// benchmark runs end to end, every guest arrives intact, and it writes what
// it promises; never how fast.

import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { makeTempDir, removeDir } from "./harness/tmp.ts";
import { METHODS } from "./benchmarks/paper/methods.ts";

const KINDS = METHODS.filter((m) => m.id !== "sgm-1" && m.id !== "sgm-2");
import type { RunRecord, Summary } from "./benchmarks/paper/results.ts";

const dir = makeTempDir("paper-bench");
afterAll(() => removeDir(dir));

describe("make bench --quick", () => {
  test("every kind of method empties the source of a busy Linux guest that arrives intact; table, JSON and PNG written, the bed torn down", async () => {
    const json = join(dir, "bench.json");
    const png = join(dir, "bench.png");
    const proc = Bun.spawn([process.execPath, join(import.meta.dir, "benchmarks", "paper.bench.ts"), "--quick", "--methods", KINDS.map((m) => m.id).join(","), "--json", json, "--png", png], {
      stdout: "pipe",
      stderr: "pipe",
    });
    const [code, out, err] = await Promise.all([proc.exited, new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
    if (code !== 0) throw new Error(`the benchmark exited ${code}:\n${err}\n${out}`);

    for (const m of KINDS) expect(out).toContain(`| ${m.label} |`);
    const data = JSON.parse(readFileSync(json, "utf8")) as { runs: RunRecord[]; summaries: Summary[]; uniqueBytes: Record<string, number> };
    expect(data.runs.map((r) => r.method).sort()).toEqual(KINDS.map((m) => m.id).sort());
    for (const run of data.runs) {
      // QEMU's own methods may fail to converge; sgm's never may, and no guest may arrive broken
      if (run.method.startsWith("sgm")) expect(run.timing).not.toBeNull();
      expect({ method: run.method, intact: run.intact, why: run.verifyError }).toEqual({ method: run.method, intact: true, why: undefined });
    }
    // the bytes crossed the bed's links: sgm's relays took pages, QEMU's went straight to the destination
    const byMethod = new Map(data.runs.map((r) => [r.method, r]));
    const relaysIn = (id: string) => ["relay1", "relay2", "relay3"].reduce((n, h) => n + byMethod.get(id)!.links[h]!.rx, 0);
    expect(relaysIn("sgm-3")).toBeGreaterThan(1 << 20);
    expect(relaysIn("precopy")).toBeLessThan(1 << 20);
    expect(byMethod.get("precopy")!.links.dst!.rx).toBeGreaterThan(data.uniqueBytes["1"]! / 2);
    for (const s of data.summaries.filter((x) => x.method.startsWith("sgm"))) expect(s.evictionOverBound).toBeGreaterThan(0);

    const image = readFileSync(png);
    expect([...image.subarray(0, 8)]).toEqual([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
    expect(image.length).toBeGreaterThan(10_000);

    // nothing of the bed is left: its namespaces carry the benchmark's pid
    const left = Bun.spawnSync(["ip", "netns", "list"]).stdout.toString();
    expect(left).not.toContain(`sgmbed-${proc.pid}-`);
    expect(existsSync(json)).toBe(true);
  }, 600_000);
});
