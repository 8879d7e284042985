// The QEMUs the tests run: Debian 12's 7.2 from the system, and 10.0 from
// bookworm-backports, fetched with apt-get download through a private
// sources list and unpacked into .cache/ beside the system one, never
// installed. It runs on the libraries 7.2 already pulled in.

import { existsSync, renameSync, rmSync } from "node:fs";
import { join } from "node:path";
import { PrivateApt } from "./apt.ts";
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
  const apt = new PrivateApt(work, ["deb http://deb.debian.org/debian bookworm-backports main"], "QEMU 10.0");
  await apt.update();
  const unpacked = join(work, "root");
  await apt.downloadAndUnpack(QEMU10_PACKAGES.map((p) => `${p}=${QEMU10_VERSION}`), unpacked);
  rmSync(folder, { recursive: true, force: true });
  renameSync(unpacked, folder);
  rmSync(work, { recursive: true, force: true });
  return binaryIn(folder);
}
