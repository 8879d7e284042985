// The compiled sgm executable, as users run it. Built on first use (make
// knows whether dist/sgm is older than its sources).

import { expect } from "bun:test";
import { join } from "node:path";
import { track } from "./processes.ts";
import { makeTempDir, removeDir } from "./tmp.ts";

const root = join(import.meta.dir, "..", "..");
let built: Promise<string> | undefined;

export function sgmBinary(): Promise<string> {
  built ??= (async () => {
    const proc = Bun.spawn(["make", "-s", "dist/sgm"], { cwd: root, stdout: "pipe", stderr: "pipe" });
    const [code, err] = await Promise.all([proc.exited, new Response(proc.stderr).text()]);
    if (code !== 0) throw new Error(`make dist/sgm failed:\n${err}`);
    return join(root, "dist", "sgm");
  })();
  return built;
}

let scratch: string | undefined;

/**
 * The environment for a spawned sgm: ours, with `extra`, and a TMPDIR of
 * this test process's own. sgm keeps its unix sockets in a directory under
 * TMPDIR that a killed sgm cannot remove, and tests kill sgm processes.
 */
export function sgmEnv(extra: Record<string, string> = {}): Record<string, string | undefined> {
  scratch ??= makeTempDir("processes");
  return { ...process.env, TMPDIR: scratch, ...extra };
}

/** Removes what sgm processes left in their TMPDIR: after the last test (preload.ts), or when a script exits. */
export function removeSgmScratch(): void {
  if (scratch !== undefined) removeDir(scratch);
  scratch = undefined;
}

// bun test fires no "exit" event (preload.ts covers it there); scripts such as the soak do
process.on("exit", removeSgmScratch);

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
  /** The command line it ran, after the binary. */
  args: string[];
}

/**
 * The run exited with `code`; if not, the failure names the command and
 * ends with what sgm printed on stderr, so a CI log says why.
 */
export function expectExit(result: RunResult, code: number): void {
  const said = result.stderr.trim().split("\n").slice(-15).join("\n");
  expect(result.code, `sgm ${result.args[0]} exited ${result.code}, not ${code}; its stderr ended:\n${said}`).toBe(code);
}

/** Runs dist/sgm to completion. */
export async function runSgm(args: string[], options: { timeoutMs?: number } = {}): Promise<RunResult> {
  const proc = Bun.spawn([await sgmBinary(), ...args], { stdout: "pipe", stderr: "pipe", stdin: "ignore", env: sgmEnv() });
  const timer = setTimeout(() => proc.kill("SIGKILL"), options.timeoutMs ?? 60_000);
  const [code, stdout, stderr] = await Promise.all([
    proc.exited,
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
  ]);
  clearTimeout(timer);
  return { code, stdout, stderr, args };
}

export interface SgmProcess {
  proc: Bun.Subprocess<"ignore", "pipe", "pipe">;
  /** Everything it printed on stderr so far. */
  stderr(): string;
  /** Waits until stderr matches. */
  waitStderr(pattern: RegExp, timeoutMs?: number): Promise<RegExpMatchArray>;
  /** Waits for exit; returns code, stdout, stderr. */
  result(): Promise<RunResult>;
}

/**
 * Starts dist/sgm in the background (with `env` added to ours, through
 * `launcher` if given); it is killed with the test's other processes.
 */
export async function startSgm(args: string[], env: Record<string, string> = {}, launcher: string[] = []): Promise<SgmProcess> {
  const proc = track(Bun.spawn([...launcher, await sgmBinary(), ...args], { stdout: "pipe", stderr: "pipe", stdin: "ignore", env: sgmEnv(env) }));
  let err = "";
  const decoder = new TextDecoder();
  const stderrDone = (async () => {
    for await (const chunk of proc.stderr) err += decoder.decode(chunk, { stream: true });
  })();
  const stdout = new Response(proc.stdout).text();
  return {
    proc,
    stderr: () => err,
    async waitStderr(pattern, timeoutMs = 30_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const m = err.match(pattern);
        if (m) return m;
        if (proc.exitCode !== null) throw new Error(`sgm ${args[0]} exited ${proc.exitCode} before printing ${pattern}:\n${err}`);
        if (Date.now() > deadline) throw new Error(`sgm ${args[0]} never printed ${pattern}:\n${err}`);
        await Bun.sleep(20);
      }
    },
    async result() {
      const [code, out] = await Promise.all([proc.exited, stdout, stderrDone]);
      return { code, stdout: out, stderr: err, args };
    },
  };
}
