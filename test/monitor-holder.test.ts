// The monitor holder against a real QEMU: it passes one client's commands
// on, out of band included, answers what it knows itself, turns a second
// client away, and holds the monitor no longer than a migration may need it.

import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { parseQmpAddress, QmpClient, QmpCommandError } from "../core/qmp/client.ts";
import { HOLDER_FACTS, type HolderFacts, holdMonitor } from "../core/qmp/monitor-holder.ts";
import { killAll } from "./harness/processes.ts";
import { TestVm } from "./harness/qemu.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";
import { within } from "./harness/within.ts";

let dir: string;
beforeAll(() => {
  dir = makeTempDir("holder");
});
afterEach(() => killAll());
afterAll(() => removeDir(dir));

/** A holder for `vm`'s monitor, run in this process; resolves once it said ready. */
async function startHolder(vm: TestVm, name: string): Promise<{ socket: string; ended: Promise<number> }> {
  const socket = join(dir, `${name}.holder`);
  const said = Promise.withResolvers<string>();
  const ended = holdMonitor(parseQmpAddress(vm.qmpPath), socket, said.resolve);
  expect(await said.promise).toBe("ready");
  return { socket, ended };
}

describe("monitor holder", () => {
  test("one client at a time uses QEMU's monitor through it, out of band included, and it answers its own facts", async () => {
    const vm = await TestVm.start({ dir, name: "held", memMiB: 32, incoming: true });
    const { socket, ended } = await startHolder(vm, "held");
    const client = await QmpClient.connect({ kind: "unix", path: socket });
    expect(client.held).toBe(true);
    expect((await client.execute<{ status: string }>("query-status")).status).toBe("inmigrate");
    const machine = await vm.qmp.execute<string>("qom-get", { path: "/machine", property: "type" });
    expect(await client.execute<HolderFacts>(HOLDER_FACTS)).toEqual({ migration: "none", machine: machine.replace(/-machine$/, "") });
    // QEMU runs it out of band, and refuses it only for what it is: no postcopy to recover
    const refused = await client.execute("migrate-recover", { uri: "unix:/nonexistent" }, { outOfBand: true }).catch((err: unknown) => err);
    expect(refused).toBeInstanceOf(QmpCommandError);
    expect((refused as QmpCommandError).desc).toMatch(/postcopy is paused/);
    // a second client is turned away, and the first goes on
    await expect(QmpClient.connect({ kind: "unix", path: socket })).rejects.toThrow(/serves one client at a time/);
    expect((await client.execute<{ status: string }>("query-status")).status).toBe("inmigrate");
    // no migration a --resume could need: it lets go of the monitor with its client
    client.close();
    expect(await within(ended, 10_000, "the holder did not end after its client left")).toBe(0);
    expect(existsSync(socket)).toBe(false);
    const direct = await QmpClient.connect(parseQmpAddress(vm.qmpPath));
    expect(direct.held).toBe(false);
    direct.close();
  }, 60_000);

  test("it ends when QEMU does, and says why it cannot hold a monitor that is not there", async () => {
    const vm = await TestVm.start({ dir, name: "gone", memMiB: 32, incoming: true });
    const { ended } = await startHolder(vm, "gone");
    await vm.kill();
    expect(await within(ended, 10_000, "the holder did not end with its QEMU")).toBe(0);
    const said = Promise.withResolvers<string>();
    const code = await holdMonitor({ kind: "unix", path: join(dir, "nothing.qmp") }, join(dir, "nothing.holder"), said.resolve);
    expect([code, await said.promise]).toEqual([69, `QMP ${join(dir, "nothing.qmp")}: no such socket`]);
  }, 60_000);
});
