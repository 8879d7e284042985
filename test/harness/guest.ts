// Builds the test guest (test/guest) with the system gcc at test time, once
// per source revision, into .cache/ (not committed).

import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync } from "node:fs";
import { join } from "node:path";

const root = join(import.meta.dir, "..", "..");
const sources = ["boot.S", "guest.c", "churn.c", "guest.h", "link.ld"].map((name) => join(root, "test", "guest", name));

let building: Promise<string> | undefined;

/** The guest's ELF, built once per test process (VMs start in parallel). */
export function buildGuest(): Promise<string> {
  building ??= build();
  return building;
}

async function build(): Promise<string> {
  const digest = createHash("sha256");
  for (const file of sources) digest.update(readFileSync(file));
  const cacheDir = join(root, ".cache");
  const out = join(cacheDir, `guest-${digest.digest("hex").slice(0, 16)}.elf`);
  if (existsSync(out)) return out;
  mkdirSync(cacheDir, { recursive: true });
  const tmp = `${out}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`;
  const proc = Bun.spawn(
    [
      "gcc", "-m32", "-ffreestanding", "-fno-pic", "-fno-pie", "-fno-stack-protector",
      "-fno-asynchronous-unwind-tables", "-O2", "-Wall", "-Wextra", "-Werror", "-nostdlib", "-static", "-no-pie",
      "-Wl,-m,elf_i386", "-Wl,--build-id=none", "-T", sources[4]!, "-o", tmp, sources[0]!, sources[1]!, sources[2]!,
    ],
    { stdout: "pipe", stderr: "pipe" },
  );
  const [code, stderr] = await Promise.all([proc.exited, new Response(proc.stderr).text()]);
  if (code !== 0) throw new Error(`building the test guest failed:\n${stderr}`);
  renameSync(tmp, out);
  return out;
}
