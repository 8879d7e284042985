// The --json reports' published schemas: current with the TypeScript types
// (cli/report-schemas.ts, checked by tsc), valid JSON Schema, and strict
// enough to refuse a report that strays. Every end-to-end test's report is
// checked against them as it is read (test/harness/cluster.ts report()).

import { describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { REPORT_SCHEMAS } from "../cli/report-schemas.ts";
import { checkReport, SCHEMA_DIR, schemaFor } from "./harness/report-schemas.ts";
import { expectExit, runSgm, startSgm } from "./harness/sgm.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";

describe("report schemas", () => {
  test.each(Object.keys(REPORT_SCHEMAS))("docs/schemas/%s.json is what cli/report-schemas.ts says", (name) => {
    const onDisk = readFileSync(join(SCHEMA_DIR, `${name}.json`), "utf8");
    const current = `${JSON.stringify(REPORT_SCHEMAS[name as keyof typeof REPORT_SCHEMAS], null, 2)}\n`;
    if (onDisk !== current) throw new Error(`docs/schemas/${name}.json is stale: run bun test/write-report-schemas.ts`);
  });

  test("each command line's report has its schema", () => {
    expect(schemaFor(["scatter", "--to", "h:1", "--json"])).toBe("scatter-report");
    expect(schemaFor(["scatter", "--plan", "--json"])).toBe("scatter-plan");
    expect(schemaFor(["gather", "--json"])).toBe("gather-report");
    expect(schemaFor(["relay", "--json"])).toBe("relay-report");
    expect(schemaFor(["check", "--json"])).toBe("check-report");
    expect(schemaFor(["evacuate", "--json"])).toBe("evacuate-report");
    expect(schemaFor(["relay"])).toBeNull();
  });

  test("a real relay report passes; one with a field renamed, missing or of the wrong type does not", async () => {
    const dir = makeTempDir("schema");
    try {
      const psk = join(dir, "psk");
      await Bun.write(psk, "sgm schema test key 0123456789\n");
      const relay = await startSgm(["relay", "--listen", "127.0.0.1:0", "--capacity", "64MiB", "--psk-file", psk, "--json"]);
      await relay.waitStderr(/relay listening on/);
      relay.proc.kill("SIGINT");
      const r = await relay.result();
      expectExit(r, 0);
      const report = JSON.parse(r.stdout) as Record<string, unknown>;
      checkReport(r.args, report);

      const { used, ...missing } = report;
      const renamed = { ...missing, usedBytes: used };
      expect(() => checkReport(r.args, missing)).toThrow(/must have required property 'used'/);
      expect(() => checkReport(r.args, renamed)).toThrow(/must NOT have additional properties/);
      expect(() => checkReport(r.args, { ...report, runs: "none" })).toThrow(/\/runs must be integer/);
    } finally {
      removeDir(dir);
    }
  });

  test("a usage error prints no report at all", async () => {
    const r = await runSgm(["relay", "--json"]);
    expectExit(r, 2);
    expect(r.stdout).toBe("");
  });
});
