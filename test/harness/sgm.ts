// The compiled sgm executable, as users run it. Built on first use (make
// knows whether dist/sgm is older than its sources).

import { join } from "node:path";

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

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs dist/sgm to completion. */
export async function runSgm(args: string[], options: { timeoutMs?: number } = {}): Promise<RunResult> {
  const proc = Bun.spawn([await sgmBinary(), ...args], { stdout: "pipe", stderr: "pipe", stdin: "ignore" });
  const timer = setTimeout(() => proc.kill("SIGKILL"), options.timeoutMs ?? 60_000);
  const [code, stdout, stderr] = await Promise.all([
    proc.exited,
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
  ]);
  clearTimeout(timer);
  return { code, stdout, stderr };
}
