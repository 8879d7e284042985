// The QEMUs the tests run: Debian 12's 7.2 from the system, and 10.0 from
// bookworm-backports, fetched with apt-get download through a private
// sources list and unpacked into .cache/ beside the system one, never
// installed. It runs on the libraries 7.2 already pulled in.

import { existsSync, mkdirSync, readdirSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { type QemuBinary, SYSTEM_QEMU } from "./qemu.ts";

const root = join(import.meta.dir, "..", "..");
const QEMU10_VERSION = "1:10.0.2+ds-2+deb13u1~bpo12+1";
const QEMU10_PACKAGES = ["qemu-system-x86", "qemu-system-common", "qemu-system-data"];

export const QEMU_7_2: QemuBinary = SYSTEM_QEMU;

let qemu10: Promise<QemuBinary> | undefined;

/** QEMU 10.0, unpacked into .cache/qemu-10.0 on first use. */
export function qemu10_0(): Promise<QemuBinary> {
  qemu10 ??= unpackQemu10();
  return qemu10;
}

function binaryIn(folder: string): QemuBinary {
  return {
    path: join(folder, "usr/bin/qemu-system-x86_64"),
    dataDirs: [join(folder, "usr/share/qemu"), "/usr/share/seabios"],
    env: { QEMU_MODULE_DIR: join(folder, "usr/lib/x86_64-linux-gnu/qemu") },
  };
}

async function unpackQemu10(): Promise<QemuBinary> {
  const folder = join(root, ".cache", "qemu-10.0");
  if (existsSync(join(folder, "usr/bin/qemu-system-x86_64"))) return binaryIn(folder);
  const work = join(root, ".cache", `qemu-10.0.${process.pid}.tmp`);
  rmSync(work, { recursive: true, force: true });
  mkdirSync(join(work, "lists/partial"), { recursive: true });
  mkdirSync(join(work, "debs"));
  writeFileSync(join(work, "sources.list"), "deb http://deb.debian.org/debian bookworm-backports main\n");
  const apt = [
    "-q",
    "-o", `Dir::Etc::SourceList=${join(work, "sources.list")}`,
    "-o", "Dir::Etc::SourceParts=/dev/null",
    "-o", `Dir::State::Lists=${join(work, "lists")}`,
  ];
  await run(["apt-get", ...apt, "update"], work);
  await run(["apt-get", ...apt, "download", ...QEMU10_PACKAGES.map((p) => `${p}=${QEMU10_VERSION}`)], join(work, "debs"));
  const unpacked = join(work, "root");
  for (const deb of readdirSync(join(work, "debs"))) await run(["dpkg", "-x", join(work, "debs", deb), unpacked], work);
  rmSync(folder, { recursive: true, force: true });
  renameSync(unpacked, folder);
  rmSync(work, { recursive: true, force: true });
  return binaryIn(folder);
}

async function run(cmd: string[], cwd: string): Promise<void> {
  const proc = Bun.spawn(cmd, { cwd, stdout: "pipe", stderr: "pipe" });
  const [code, err] = await Promise.all([proc.exited, new Response(proc.stderr).text()]);
  if (code !== 0) throw new Error(`${cmd.slice(0, 2).join(" ")} failed (${code}) while fetching QEMU 10.0:\n${err}`);
}
