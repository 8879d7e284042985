// The QMP client against a live QEMU: commands, events, errors, and QEMU
// going away in the middle of a command.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { SgmError } from "../core/errors.ts";
import { parseQmpAddress, QmpClient, QmpCommandError } from "../core/qmp/client.ts";
import { killAll } from "./harness/processes.ts";
import { TestVm } from "./harness/qemu.ts";
import { freePort, makeTempDir, removeDir } from "./harness/tmp.ts";

let dir: string;

beforeAll(() => {
  dir = makeTempDir("qmp");
});

afterAll(async () => {
  await killAll();
  removeDir(dir);
});

describe("parseQmpAddress", () => {
  test("unix and tcp forms", () => {
    expect(parseQmpAddress("/run/vm.qmp")).toEqual({ kind: "unix", path: "/run/vm.qmp" });
    expect(parseQmpAddress("unix:/run/vm.qmp")).toEqual({ kind: "unix", path: "/run/vm.qmp" });
    expect(parseQmpAddress("tcp:127.0.0.1:4444")).toEqual({ kind: "tcp", host: "127.0.0.1", port: 4444 });
    expect(parseQmpAddress("[::1]:4444")).toEqual({ kind: "tcp", host: "::1", port: 4444 });
    expect(() => parseQmpAddress("tcp:host:99999")).toThrow(/port out of range/);
  });
});

describe("QMP client against QEMU", () => {
  test("commands, events and errors over a unix socket", async () => {
    const vm = await TestVm.start({ dir, name: "qmp-unix", memMiB: 32 });
    const qmp = await QmpClient.connect({ kind: "unix", path: vm.qmpPath });
    expect(qmp.version.major).toBeGreaterThanOrEqual(7);

    const version = await qmp.execute<{ qemu: { major: number } }>("query-version");
    expect(version.qemu.major).toBe(qmp.version.major);
    expect((await qmp.execute<{ status: string }>("query-status")).status).toBe("running");

    const stopped = qmp.waitForEvent("STOP", undefined, 5_000);
    await qmp.execute("stop");
    await stopped;
    const resumed = qmp.waitForEvent("RESUME", undefined, 5_000);
    await qmp.execute("cont");
    await resumed;

    const err = await qmp.execute("no-such-command").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpCommandError);
    expect((err as QmpCommandError).command).toBe("no-such-command");
    expect((err as QmpCommandError).errorClass).toBe("CommandNotFound");
    expect((err as QmpCommandError).message).toContain("no-such-command");

    const badArg = await qmp.execute("migrate", { uri: "nonsense:x" }).catch((e: unknown) => e);
    expect(badArg).toBeInstanceOf(QmpCommandError);
    expect((badArg as QmpCommandError).message).toMatch(/QEMU refused 'migrate': .+/);

    qmp.close();
    await qmp.closed;
    await vm.kill();
  });

  test("a tcp socket works the same", async () => {
    const port = await freePort();
    const vm = await TestVm.start({
      dir,
      name: "qmp-tcp",
      memMiB: 32,
      extraArgs: ["-qmp", `tcp:127.0.0.1:${port},server=on,wait=off`],
    });
    const qmp = await QmpClient.connect(parseQmpAddress(`127.0.0.1:${port}`));
    expect((await qmp.execute<{ status: string }>("query-status")).status).toBe("running");
    qmp.close();
    await vm.kill();
  });

  test("QEMU exiting mid-command rejects the command and closes the client", async () => {
    const vm = await TestVm.start({ dir, name: "qmp-exit", memMiB: 32 });
    const qmp = await QmpClient.connect({ kind: "unix", path: vm.qmpPath });
    // A frozen QEMU cannot answer, so the command is surely pending when it dies.
    vm.proc.kill("SIGSTOP");
    const pending = qmp.execute("query-status").catch((e: unknown) => e);
    const event = qmp.waitForEvent("SHUTDOWN", undefined, 10_000).catch((e: unknown) => e);
    await Bun.sleep(100);
    vm.proc.kill("SIGKILL");
    const err = await pending;
    expect(err).toBeInstanceOf(SgmError);
    expect((err as SgmError).kind).toBe("unavailable");
    expect((err as SgmError).message).toContain("'query-status' was pending");
    expect(((await event) as SgmError).message).toMatch(/closed while waiting for SHUTDOWN/);
    await qmp.closed;
    expect(qmp.isOpen).toBe(false);
    await expect(qmp.execute("query-status")).rejects.toThrow(/closed; cannot run 'query-status'/);
  });

  test("SHUTDOWN is delivered when the guest quits", async () => {
    const vm = await TestVm.start({ dir, name: "qmp-quit", memMiB: 32 });
    const qmp = await QmpClient.connect({ kind: "unix", path: vm.qmpPath });
    const shutdown = qmp.waitForEvent("SHUTDOWN", undefined, 10_000);
    await qmp.execute("quit");
    expect((await shutdown).event).toBe("SHUTDOWN");
    await qmp.closed;
    expect(await vm.proc.exited).toBe(0);
  });

  test("connecting to a missing socket is a clear unavailable error", async () => {
    const err = await QmpClient.connect({ kind: "unix", path: `${dir}/absent.qmp` }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SgmError);
    expect((err as SgmError).exitCode).toBe(69);
    expect((err as SgmError).message).toBe(`QMP ${dir}/absent.qmp: no such socket`);
  });
});
