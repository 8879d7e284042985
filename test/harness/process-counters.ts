// What the kernel counts for a process (proc(5)), for benchmarks that
// measure an sgm process from outside it, between two points of its life.

export interface ProcessCounters {
  cpuUserSeconds: number;
  cpuSystemSeconds: number;
  mainThreadCpuSeconds: number | null;
  peakRssBytes: number;
  minorPageFaults: number;
}

/** What the kernel counts for process `pid` so far (read as cli/output.ts reads its own main thread's). */
export async function processCounters(pid: number): Promise<ProcessCounters> {
  const fields = async (path: string) => {
    const stat = await Bun.file(path).text();
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  };
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
