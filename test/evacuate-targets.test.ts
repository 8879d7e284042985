// Where `sgm evacuate` finds its VMs: a map file, --vm, and the QMP sockets
// of a directory (real unix sockets, as a management layer leaves them).

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, symlinkSync } from "node:fs";
import { join } from "node:path";
import { parseTargets } from "../cli/evacuate-targets.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";

let dir: string;
const listeners: Array<{ stop(): void }> = [];

beforeAll(async () => {
  dir = makeTempDir("targets");
  const run = join(dir, "run");
  mkdirSync(join(run, "not-a-vm"), { recursive: true });
  for (const name of ["web1.qmp", "db.sock", "cache"]) {
    listeners.push(Bun.listen({ unix: join(run, name), socket: { data() {} } }));
  }
  await Bun.write(join(run, "web2.qmp"), "a plain file, not a socket\n");
  symlinkSync(join(run, "db.sock"), join(run, "db-alias.qmp"));
});
afterAll(() => {
  for (const l of listeners) l.stop();
  removeDir(dir);
});

describe("evacuate's VMs", () => {
  test("--qmp-dir: every unix socket (links to one included), named for its file less the extension, each to --to", () => {
    const targets = parseTargets({ qmpDir: join(dir, "run"), to: "dst:7700" });
    const gather = { host: "dst", port: 7700 };
    expect(targets).toEqual([
      { name: "cache", qmp: join(dir, "run", "cache"), gather },
      { name: "db-alias", qmp: join(dir, "run", "db-alias.qmp"), gather },
      { name: "db", qmp: join(dir, "run", "db.sock"), gather },
      { name: "web1", qmp: join(dir, "run", "web1.qmp"), gather },
    ]);
  });

  test("--vm and --qmp-dir together; a name given by both is refused", () => {
    expect(parseTargets({ vm: ["extra=/run/extra.qmp"], qmpDir: join(dir, "run"), to: "dst:1" }).map((t) => t.name)).toEqual(["extra", "cache", "db-alias", "db", "web1"]);
    expect(() => parseTargets({ vm: ["web1=/elsewhere.qmp"], qmpDir: join(dir, "run"), to: "dst:1" })).toThrow("VM 'web1' is named twice (--vm, --qmp-dir)");
  });

  test("a map file: comments and blank lines skipped, each VM to its own gather; bad lines named by number", async () => {
    const map = join(dir, "hosts.map");
    await Bun.write(map, "# name qmp gather\n\nweb1 /run/qemu/web1.qmp dst1:7700   # the front end\ndb /run/qemu/db.qmp [fd00::2]:7700\n");
    expect(parseTargets({ map })).toEqual([
      { name: "web1", qmp: "/run/qemu/web1.qmp", gather: { host: "dst1", port: 7700 } },
      { name: "db", qmp: "/run/qemu/db.qmp", gather: { host: "fd00::2", port: 7700 } },
    ]);
    await Bun.write(map, "web1 /run/qemu/web1.qmp dst1:7700\nweb1 /run/qemu/other.qmp dst2:7700\n");
    expect(() => parseTargets({ map })).toThrow(`--map ${map} line 2: VM 'web1' is named twice`);
    await Bun.write(map, "web1 /run/qemu/web1.qmp\n");
    expect(() => parseTargets({ map })).toThrow(`--map ${map} line 1: 'web1 /run/qemu/web1.qmp': expected NAME QMP_SOCKET GATHER_HOST:PORT`);
    await Bun.write(map, "# nothing\n");
    expect(() => parseTargets({ map })).toThrow(`--map ${map}: names no VM`);
  });
});
