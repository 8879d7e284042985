// sgm's native code loads where TMPDIR is mounted noexec, as hardened hosts
// mount /tmp: Bun unpacks an embedded library there to load it, and the
// kernel will not map it executable, so core/native-library.ts loads it
// from memory instead. Mounting a tmpfs takes root, as the bed of hosts does.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync, mkdirSync, readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { hash as blake3 } from "blake3-wasm";
import { openLibrary } from "../core/native-library.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";
import { sgmBinary, sgmEnv } from "./harness/sgm.ts";

const root = join(import.meta.dir, "..");
let dir: string;
let noexec: string;
let mounted = false;

beforeAll(() => {
  dir = makeTempDir("native-library");
  noexec = join(dir, "noexec");
  mkdirSync(noexec);
  const mount = Bun.spawnSync(["mount", "-t", "tmpfs", "-o", "noexec,size=16m", "tmpfs", noexec]);
  if (mount.exitCode !== 0) throw new Error(`mounting a noexec tmpfs needs root, as the bed of hosts does: ${mount.stderr.toString().trim()}`);
  mounted = true;
});

afterAll(() => {
  // lazily: the loader that failed to map a library there may not have let go of it yet
  if (mounted) Bun.spawnSync(["umount", "-l", noexec]);
  removeDir(dir);
});

describe("native code on a noexec TMPDIR", () => {
  test("a library the kernel will not map from its file loads from memory, and hashes as BLAKE3 does", () => {
    const path = join(noexec, "page-digest.so");
    copyFileSync(join(root, "native", "page-digest.so"), path);
    const symbols = { sgm_digest_page: { args: ["ptr", "ptr"], returns: "void" } } as const;
    const page = Uint8Array.from({ length: 4096 }, (_, i) => (i * 31) & 0xff);
    const out = new Uint8Array(32);
    const library = openLibrary(path, symbols);
    library.symbols.sgm_digest_page(page, out);
    expect(Buffer.from(out).toString("hex")).toBe(Buffer.from(blake3(page) as Uint8Array).toString("hex"));
    library.close();
    rmSync(path);
  });

  test("dist/sgm runs with TMPDIR there", async () => {
    // its commands' modules load the page digest, which nothing can stand in for: an sgm without it says only why
    const proc = Bun.spawn([await sgmBinary(), "--version"], { stdout: "pipe", stderr: "pipe", env: { ...sgmEnv(), TMPDIR: noexec } });
    const [code, stdout, stderr] = await Promise.all([proc.exited, new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
    expect(stderr).toBe("");
    expect(code).toBe(0);
    expect(stdout).toStartWith("sgm ");
    // what Bun unpacked there and could not load is all that is left
    expect(readdirSync(noexec).every((name) => name.startsWith(".bun-"))).toBe(true);
  });

  test("a module that cannot load is one line on stderr with its exit code, not a stack", async () => {
    // the page digest refuses a setting it does not know as its module loads, before any output module has
    const proc = Bun.spawn([await sgmBinary(), "--version"], { stdout: "pipe", stderr: "pipe", env: { ...sgmEnv(), SGM_NATIVE_DIGEST: "5" } });
    const [code, stdout, stderr] = await Promise.all([proc.exited, new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
    expect(stderr).toBe("sgm: error: SGM_NATIVE_DIGEST=5: 0 (a page at a time) or 8 (eight at most), or unset\n");
    expect(stdout).toBe("");
    expect(code).toBe(2);
  });
});
