// Settings the runtime reads only at process start, so sgm runs itself
// again with them set.
//
// Bun's allocator (mimalloc) hands memory back to the kernel 10 ms after it
// is freed, and the socket layer allocates a fresh buffer for every read:
// on a machine where a page fault costs ~15 us, sgm then spent a third of
// its CPU faulting in memory it had just given away. MIMALLOC_PURGE_DELAY=-1
// keeps freed memory for reuse; measured on a 1 GiB eviction here it cut
// scatter from 6.0 to 3.3 CPU-s/GiB, the gather from 7.7 to 4.6 and each
// relay from 21.8 to 11.1 (test/benchmarks/cost.bench.ts).
//
// JavaScriptCore compiles code with its top tier (FTL), on threads of its
// own, once it has run 64000 times (Bun 1.4.5's default); for a 1 GiB VM
// those threads took 0.16 to 0.24 CPU-s of each role, a fifth of what it
// spent. At 1000000 a role compiles only what runs long enough to repay
// it (docs/cost-history.md, "A later top-tier compile"). An option Bun
// does not know fails at start, loudly, in every test: a Bun release that
// drops it cannot pass unnoticed.

import { closeSync, fstatSync } from "node:fs";
import { constants } from "node:os";
import { selfCommand } from "./self.ts";

/** What every sgm process runs with; benchmarks that start one process alone set the same. */
export const RUNTIME_SETTINGS: Readonly<Record<string, string>> = {
  MIMALLOC_PURGE_DELAY: "-1",
  BUN_JSC_thresholdForFTLOptimizeAfterWarmUp: "1000000",
};

/** A pipe from the first process: when it dies (even by SIGKILL) the pipe ends, and so does its child. */
const LIFELINE = "SGM_LIFELINE_FD";

/**
 * Returns null when this process already runs with every setting (the first
 * process set them, or whoever started sgm did); otherwise runs sgm again
 * with them, passing on stdio, the --ready-fd descriptor and signals, and
 * returns the exit code to end with. A setting already in the environment
 * is the operator's, and stays as they set it.
 */
export async function runWithRuntimeSettings(argv: string[]): Promise<number | null> {
  if (Object.keys(RUNTIME_SETTINGS).every((name) => process.env[name] !== undefined)) {
    followLifeline();
    return null;
  }
  const self = selfCommand();
  const stdio: Array<"inherit" | "ignore" | "pipe" | number> = ["inherit", "inherit", "inherit"];
  const readyFd = passedFd(argv);
  if (readyFd !== null) {
    while (stdio.length < readyFd) stdio.push("ignore");
    stdio.push(readyFd);
  }
  const lifeline = stdio.length;
  stdio.push("pipe");
  // Bun's types list other extra descriptors, but a number passes one on as it is
  const env = { ...RUNTIME_SETTINGS, ...process.env, [LIFELINE]: String(lifeline) };
  const child = Bun.spawn([...self, ...argv], { env, stdio: stdio as unknown as ["inherit", "inherit", "inherit"] });
  // the child announces on it and closes it; a reader waits for every copy to close
  if (readyFd !== null) closeSync(readyFd);
  const forward = (signal: NodeJS.Signals) => child.kill(signal);
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) process.on(signal, forward);
  const code = await child.exited;
  const signal = child.signalCode;
  if (signal === null) return code;
  return 128 + (typeof signal === "number" ? signal : (constants.signals[signal] ?? 0));
}

/** The --ready-fd descriptor, if it is one this process has open (the child judges the rest). */
function passedFd(argv: string[]): number | null {
  const at = argv.indexOf("--ready-fd");
  const fd = at >= 0 ? Number(argv[at + 1]) : NaN;
  if (!Number.isInteger(fd) || fd < 3 || fd > 1023) return null;
  try {
    fstatSync(fd);
    return fd;
  } catch {
    return null;
  }
}

/** In the second process: end at once, as if killed, when the first one is gone. */
function followLifeline(): void {
  const fd = Number(process.env[LIFELINE]);
  if (!Number.isInteger(fd) || fd < 3) return;
  delete process.env[LIFELINE];
  void (async () => {
    try {
      for await (const chunk of Bun.file(fd).stream()) void chunk;
    } catch {
      // an error ends the pipe as surely as its end does
    }
    process.kill(process.pid, "SIGKILL");
  })();
}
