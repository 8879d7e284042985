// Starts real qemu-system-x86_64 processes running the test guest under TCG.
// Each VM gets two QMP sockets: one for sgm (or whatever the test drives)
// and one the harness keeps for itself, since a QMP socket takes one client.

import { existsSync, readFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { QmpClient } from "../../core/qmp/client.ts";
import { buildGuest } from "./guest.ts";
import { linuxGuest } from "./linux-guest.ts";
import { track } from "./processes.ts";

export interface QemuBinary {
  /** Executable path or name on PATH. */
  path: string;
  /** Extra -L firmware directories, for QEMUs unpacked beside the system one. */
  dataDirs: string[];
  /** Environment for it (QEMU_MODULE_DIR for an unpacked QEMU). */
  env?: Record<string, string>;
}

export const SYSTEM_QEMU: QemuBinary = { path: "qemu-system-x86_64", dataDirs: [] };

/** Stable on every QEMU from 7.2 on, so any two of them can migrate. */
export const DEFAULT_MACHINE = "pc-i440fx-7.2";

/** The Linux test guest (test/linux-guest): sizes in MiB, churn in changes per second. */
export interface LinuxGuestOptions {
  randMiB: number;
  churnMiB: number;
  churnRate: number;
}

export interface VmOptions {
  dir: string;
  name: string;
  memMiB?: number;
  seed?: number;
  /** Pages the guest dirties per second; 0 = none. */
  rate?: number;
  /** Churn steps per second in the guest's churn region (test/guest/churn.c); 0 = none. */
  churn?: number;
  /** Boot the Linux test guest instead of the bare test guest. */
  linux?: LinuxGuestOptions;
  /** Start with -incoming defer, as a migration destination. */
  incoming?: boolean;
  machine?: string;
  binary?: QemuBinary;
  extraArgs?: string[];
  /** Runs QEMU through this (a host of the bed: ip netns exec NS). */
  launcher?: string[];
}

export interface GuestLayout {
  seed: number;
  /** Versioned pages (guest.c). */
  dataStart: number;
  dataEnd: number;
  scratchStart: number;
  scratchEnd: number;
  /** The churn region and its table (churn.c); empty for guests without one. */
  churnStart: number;
  tableStart: number;
  tableEnd: number;
}

export class TestVm {
  readonly name: string;
  /** QMP socket for sgm or the test's migration driver. */
  readonly qmpPath: string;
  readonly serialLog: string;
  /** What QEMU printed (stdout and stderr). */
  readonly qemuLog: string;
  readonly memBytes: number;
  readonly proc: Subprocess;
  /** The harness's own QMP connection (second monitor). */
  readonly qmp: QmpClient;
  private readonly serialPath: string;
  private serial: net.Socket | undefined;

  private constructor(name: string, dir: string, memMiB: number, proc: Subprocess, qmp: QmpClient) {
    this.name = name;
    this.qmpPath = join(dir, `${name}.qmp`);
    this.serialPath = join(dir, `${name}.serial`);
    this.serialLog = join(dir, `${name}.serial.log`);
    this.qemuLog = join(dir, `${name}.qemu.log`);
    this.memBytes = memMiB * 1024 * 1024;
    this.proc = proc;
    this.qmp = qmp;
  }

  static async start(options: VmOptions): Promise<TestVm> {
    const { dir, name } = options;
    const memMiB = options.memMiB ?? 256;
    const binary = options.binary ?? SYSTEM_QEMU;
    const seed = options.seed ?? 1;
    const boot = options.linux
      ? await linuxGuest().then((image) => [
          "-kernel", image.kernel,
          "-initrd", image.initrd,
          "-append", `console=ttyS0 quiet sgm.rand=${options.linux!.randMiB} sgm.churn=${options.linux!.churnMiB} sgm.seed=${seed} sgm.rate=${options.linux!.churnRate}`,
        ])
      : ["-kernel", await buildGuest(), "-append", `seed=${seed} rate=${options.rate ?? 0} churn=${options.churn ?? 0}`];
    const args = [
      ...(options.launcher ?? []),
      binary.path,
      ...binary.dataDirs.flatMap((d) => ["-L", d]),
      "-name", name,
      "-machine", options.machine ?? DEFAULT_MACHINE,
      "-accel", "tcg",
      "-m", String(memMiB),
      "-nodefaults",
      "-display", "none",
      ...boot,
      "-chardev", `socket,id=ser0,path=${join(dir, `${name}.serial`)},server=on,wait=off,logfile=${join(dir, `${name}.serial.log`)}`,
      "-serial", "chardev:ser0",
      "-qmp", `unix:${join(dir, `${name}.qmp`)},server=on,wait=off`,
      "-qmp", `unix:${join(dir, `${name}.harness.qmp`)},server=on,wait=off`,
      ...(options.incoming ? ["-incoming", "defer"] : []),
      ...(options.extraArgs ?? []),
    ];
    const log = Bun.file(join(dir, `${name}.qemu.log`));
    const proc = track(Bun.spawn(args, { stdout: log, stderr: log, stdin: "ignore", env: { ...process.env, ...binary.env } }));
    const harnessQmp = join(dir, `${name}.harness.qmp`);
    const deadline = Date.now() + 20_000;
    for (;;) {
      if (proc.exitCode !== null) {
        throw new Error(`QEMU ${name} exited with ${proc.exitCode}: ${readFileSync(join(dir, `${name}.qemu.log`), "utf8")}`);
      }
      if (existsSync(harnessQmp)) {
        try {
          const qmp = await QmpClient.connect({ kind: "unix", path: harnessQmp }, { timeoutMs: 5_000 });
          return new TestVm(name, dir, memMiB, proc, qmp);
        } catch (err) {
          if (Date.now() > deadline) throw err;
        }
      }
      if (Date.now() > deadline) throw new Error(`QEMU ${name}: no QMP socket after 20 s`);
      await Bun.sleep(20);
    }
  }

  serialText(): string {
    return existsSync(this.serialLog) ? readFileSync(this.serialLog, "utf8") : "";
  }

  /** Waits until the guest's serial output matches `pattern`. */
  async waitSerial(pattern: RegExp, timeoutMs = 60_000): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const match = this.serialText().match(pattern);
      if (match) return match;
      if (Date.now() > deadline) {
        throw new Error(`${this.name}: serial output never matched ${pattern}; got:\n${this.serialText()}`);
      }
      if (this.proc.exitCode !== null) throw new Error(`${this.name}: QEMU exited (${this.proc.exitCode})`);
      await Bun.sleep(25);
    }
  }

  /** Waits for the guest to have filled its memory; returns its layout. */
  async waitFilled(timeoutMs = 120_000): Promise<GuestLayout> {
    await this.waitSerial(/SGMGUEST filled/, timeoutMs);
    return this.layout();
  }

  layout(): GuestLayout {
    const m = this.serialText().match(
      /SGMGUEST boot seed=(\d+) rate=\d+ data=(0x[0-9a-f]+)-(0x[0-9a-f]+) scratch=(0x[0-9a-f]+)-(0x[0-9a-f]+) churn=(0x[0-9a-f]+)-0x[0-9a-f]+ table=(0x[0-9a-f]+)-(0x[0-9a-f]+)/,
    );
    if (!m) throw new Error(`${this.name}: guest has not booted`);
    return {
      seed: Number(m[1]),
      dataStart: Number(m[2]),
      dataEnd: Number(m[3]),
      scratchStart: Number(m[4]),
      scratchEnd: Number(m[5]),
      churnStart: Number(m[6]),
      tableStart: Number(m[7]),
      tableEnd: Number(m[8]),
    };
  }

  /** Sends a one-byte command to the guest: h (halt), v (verify), s (status), x (spoil one churn page). */
  async sendSerial(command: "h" | "v" | "s" | "x"): Promise<void> {
    if (!this.serial) {
      this.serial = await new Promise<net.Socket>((resolve, reject) => {
        const socket = net.connect({ path: this.serialPath }, () => resolve(socket));
        socket.on("error", (err) => void this.whyUnreachable().then((why) => reject(new Error(`${this.name}: cannot connect to its serial socket (${err.message}); ${why}`))));
      });
      this.serial.on("data", () => {}); // output is read from the log file
    }
    this.serial.write(command);
  }

  /** Stops dirtying, has the guest check every page, and waits for it to halt. */
  async haltGuest(timeoutMs = 60_000): Promise<{ verified: boolean; report: string }> {
    await this.sendSerial("h");
    await this.waitSerial(/SGMGUEST halted/, timeoutMs);
    const text = this.serialText();
    const report = text.slice(text.lastIndexOf("SGMGUEST halt "));
    return { verified: /SGMGUEST verify ok/.test(report), report };
  }

  /** The guest's dirtying counter (pass and position), asked over serial. */
  async dirtyCounter(): Promise<number> {
    const before = this.serialText().length;
    await this.sendSerial("s");
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline) {
      const m = this.serialText().slice(before).match(/SGMGUEST status pass=(\d+) pos=(\d+)/);
      if (m) return Number(m[1]) * 1e9 + Number(m[2]);
      await Bun.sleep(20);
    }
    throw new Error(`${this.name}: guest did not answer`);
  }

  /** Does the guest run (its counter moves)? For guests that dirty memory. */
  async keepsRunning(): Promise<boolean> {
    const a = await this.dirtyCounter();
    await Bun.sleep(300);
    return (await this.dirtyCounter()) > a;
  }

  /** What became of this QEMU, for a failure's message: its exit, or its run state, and the end of its log. */
  private async whyUnreachable(): Promise<string> {
    const proc = this.proc;
    let state: string;
    if (proc.exitCode !== null || proc.signalCode !== null) state = `QEMU exited (code ${proc.exitCode}, signal ${proc.signalCode})`;
    else state = await this.status().then((s) => `QEMU runs, status ${s}`, (err: Error) => `QEMU runs, its QMP did not answer (${err.message})`);
    const log = existsSync(this.qemuLog) ? readFileSync(this.qemuLog, "utf8").trim().split("\n").slice(-10).join("\n") : "";
    return `${state}; its log ${log ? `ended:\n${log}` : "is empty"}`;
  }

  async status(): Promise<string> {
    const r = await this.qmp.execute<{ status: string }>("query-status");
    return r.status;
  }

  async kill(): Promise<void> {
    this.serial?.destroy();
    this.qmp.close();
    this.proc.kill("SIGKILL");
    await this.proc.exited;
  }
}
