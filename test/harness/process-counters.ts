// What the kernel counts for a process (proc(5)), for benchmarks that
// measure an sgm process from outside it, between two points of its life,
// and for the whole machine.

import type { Subprocess } from "bun";

export interface ProcessCounters {
  cpuUserSeconds: number;
  cpuSystemSeconds: number;
  mainThreadCpuSeconds: number | null;
  peakRssBytes: number;
  minorPageFaults: number;
}

/** What the kernel counts for process `pid` so far (read as cli/output.ts reads its own main thread's). */
export async function processCounters(pid: number): Promise<ProcessCounters> {
  const fields = async (path: string) => statFields(await Bun.file(path).text());
  const all = await fields(`/proc/${pid}/stat`);
  const main = await fields(`/proc/${pid}/task/${pid}/stat`);
  const hwm = (await Bun.file(`/proc/${pid}/status`).text()).match(/VmHWM:\s+(\d+) kB/)![1]!;
  // minflt, utime and stime: fields 10, 14 and 15 of proc(5), times in ticks of 1/100 s on Linux
  return {
    minorPageFaults: Number(all[7]),
    cpuUserSeconds: Number(all[11]) / 100,
    cpuSystemSeconds: Number(all[12]) / 100,
    mainThreadCpuSeconds: (Number(main[11]) + Number(main[12])) / 100,
    peakRssBytes: Number(hwm) * 1024,
  };
}

/** CPU seconds (user and system) `proc` has spent so far; in all, once it has exited. */
export async function cpuSecondsOf(proc: Subprocess): Promise<number> {
  if (proc.exitCode === null && proc.signalCode === null) {
    // utime and stime, fields 14 and 15 of proc(5), in ticks of 1/100 s;
    // a process that has exited but is not reaped yet still has them here
    const stat = await Bun.file(`/proc/${proc.pid}/stat`)
      .text()
      .catch((err: NodeJS.ErrnoException) => {
        if (err.code !== "ENOENT") throw err;
        return null; // exited and reaped between the two looks
      });
    if (stat !== null) {
      const fields = statFields(stat);
      return (Number(fields[11]) + Number(fields[12])) / 100;
    }
    await proc.exited;
  }
  return Number(proc.resourceUsage()!.cpuTime.total) / 1e6;
}

/** The whole machine's CPU seconds since boot, all and busy (not idle, not waiting on I/O), from /proc/stat. */
export async function machineCpuSeconds(): Promise<{ all: number; busy: number }> {
  // user, nice, system, idle, iowait, irq, softirq, steal: the fields after
  // them (guest time) are counted in user and nice already
  const ticks = (await Bun.file("/proc/stat").text()).split("\n")[0]!.trim().split(/\s+/).slice(1, 9).map(Number);
  const all = ticks.reduce((a, b) => a + b, 0);
  return { all: all / 100, busy: (all - ticks[3]! - ticks[4]!) / 100 };
}

/** A stat line's fields after the command's name, which may hold spaces and parentheses: field 3 of proc(5) is [0]. */
function statFields(stat: string): string[] {
  return stat.slice(stat.lastIndexOf(")") + 2).split(" ");
}
