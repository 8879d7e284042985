// Every process a test starts is registered here and killed when the test
// file ends or the test process exits, so no QEMU outlives its test.

import type { Subprocess } from "bun";

const live = new Set<Subprocess>();

export function track<T extends Subprocess>(proc: T): T {
  live.add(proc);
  void proc.exited.then(() => live.delete(proc));
  return proc;
}

/** Kills every process started and still running, but those in `spare`. */
export async function killAll(spare: readonly Subprocess[] = []): Promise<void> {
  const procs = [...live].filter((proc) => !spare.includes(proc));
  for (const proc of procs) proc.kill("SIGKILL");
  await Promise.all(procs.map((proc) => proc.exited));
}

process.on("exit", () => {
  for (const proc of live) proc.kill("SIGKILL");
});
