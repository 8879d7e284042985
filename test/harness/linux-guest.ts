// The real Linux test guest: Debian's cloud kernel and busybox-static,
// fetched with apt-get download (as QEMU 10.0 is) into .cache/, and an
// initramfs of our own: test/linux-guest/init, and churn.c built static.
// Built once per source revision; nothing here is committed.

import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { PrivateApt } from "./apt.ts";

const root = join(import.meta.dir, "..", "..");
const cacheDir = join(root, ".cache");
const sourceDir = join(root, "test", "linux-guest");

export interface LinuxGuestImage {
  kernel: string;
  initrd: string;
}

let building: Promise<LinuxGuestImage> | undefined;

/** Kernel and initramfs of the Linux test guest, built once per test process. */
export function linuxGuest(): Promise<LinuxGuestImage> {
  building ??= build();
  return building;
}

async function build(): Promise<LinuxGuestImage> {
  const packages = await fetchPackages();
  const digest = createHash("sha256");
  for (const name of ["init", "churn.c"]) digest.update(readFileSync(join(sourceDir, name)));
  digest.update(readFileSync(packages.busybox));
  const initrd = join(cacheDir, `linux-guest-${digest.digest("hex").slice(0, 16)}.cpio.gz`);
  if (!existsSync(initrd)) {
    const churn = join(cacheDir, `churn.${process.pid}.tmp`);
    await run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", churn, join(sourceDir, "churn.c")], cacheDir, "building churn");
    const cpio = new CpioWriter();
    for (const dir of ["bin", "dev", "proc", "sys", "mnt"]) cpio.directory(dir);
    cpio.device("dev/console", 5, 1);
    cpio.file("bin/busybox", readFileSync(packages.busybox), 0o755);
    cpio.file("bin/churn", readFileSync(churn), 0o755);
    cpio.file("init", readFileSync(join(sourceDir, "init")), 0o755);
    rmSync(churn);
    const tmp = `${initrd}.${process.pid}.tmp`;
    writeFileSync(tmp, Bun.gzipSync(cpio.finish()));
    renameSync(tmp, initrd);
  }
  return { kernel: packages.kernel, initrd };
}

/** Debian 12's cloud kernel (whatever linux-image-cloud-amd64 points at today) and busybox-static. */
async function fetchPackages(): Promise<{ kernel: string; busybox: string }> {
  const folder = join(cacheDir, "linux-guest-debs");
  const found = () => {
    if (!existsSync(folder)) return null;
    const files = readdirSync(join(folder, "root", "boot")).filter((f) => f.startsWith("vmlinuz-"));
    const busybox = join(folder, "root", "bin", "busybox");
    return files.length === 1 && existsSync(busybox) ? { kernel: join(folder, "root", "boot", files[0]!), busybox } : null;
  };
  const have = found();
  if (have) return have;
  const work = join(cacheDir, `linux-guest.${process.pid}.tmp`);
  const apt = new PrivateApt(
    work,
    ["deb http://deb.debian.org/debian bookworm main", "deb http://deb.debian.org/debian-security bookworm-security main"],
    "the Linux test guest",
  );
  await apt.update();
  const depends = await apt.depends("linux-image-cloud-amd64");
  const image = depends.match(/Depends: (linux-image-[0-9][^\s]*-cloud-amd64)/)?.[1];
  if (!image) throw new Error(`linux-image-cloud-amd64 names no kernel:\n${depends}`);
  const unpacked = join(work, "root");
  await apt.downloadAndUnpack([image, "busybox-static"], unpacked);
  rmSync(join(unpacked, "lib"), { recursive: true, force: true }); // the modules: the initramfs needs none
  rmSync(folder, { recursive: true, force: true });
  mkdirSync(folder, { recursive: true });
  renameSync(unpacked, join(folder, "root"));
  rmSync(work, { recursive: true, force: true });
  const fetched = found();
  if (!fetched) throw new Error(`no kernel and busybox in ${folder}`);
  return fetched;
}

async function run(cmd: string[], cwd: string, what: string): Promise<void> {
  const proc = Bun.spawn(cmd, { cwd, stdout: "pipe", stderr: "pipe" });
  const [code, err] = await Promise.all([proc.exited, new Response(proc.stderr).text()]);
  if (code !== 0) throw new Error(`${what} failed (${code}) while preparing the Linux test guest:\n${err}`);
}

/** The "newc" cpio format the kernel unpacks an initramfs from. */
class CpioWriter {
  private readonly parts: Uint8Array[] = [];
  private ino = 1;

  directory(name: string): void {
    this.entry(name, 0o040755, new Uint8Array(0));
  }

  file(name: string, data: Uint8Array, mode: number): void {
    this.entry(name, 0o100000 | mode, data);
  }

  device(name: string, major: number, minor: number): void {
    this.entry(name, 0o020600, new Uint8Array(0), major, minor);
  }

  finish(): Uint8Array<ArrayBuffer> {
    this.entry("TRAILER!!!", 0, new Uint8Array(0));
    const out = new Uint8Array(this.parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const part of this.parts) {
      out.set(part, at);
      at += part.length;
    }
    return out;
  }

  private entry(name: string, mode: number, data: Uint8Array, rdevMajor = 0, rdevMinor = 0): void {
    const nameBytes = Buffer.from(`${name}\0`);
    const fields = [this.ino++, mode, 0, 0, 1, 0, data.length, 0, 0, rdevMajor, rdevMinor, nameBytes.length, 0];
    const header = Buffer.from(`070701${fields.map((f) => f.toString(16).padStart(8, "0")).join("")}`);
    this.parts.push(header, nameBytes, pad(header.length + nameBytes.length), data, pad(data.length));
  }
}

function pad(length: number): Uint8Array {
  return new Uint8Array((4 - (length % 4)) % 4);
}
