// What a whole machine, and the two QEMUs of a migration in it, spent while
// the migration ran: on a machine of few cores the processes of an sgm
// migration (two QEMUs, the scatter, the gather) take turns on them, so how
// long it took against QEMU's own migration is bounded by their CPU seconds
// rather than by any one process's pace.

import { cpus } from "node:os";
import type { VmPair } from "./cluster.ts";
import { cpuSecondsOf, machineCpuSeconds } from "./process-counters.ts";

export interface MachineAccount {
  wallMs: number;
  /** CPU seconds the machine had, and spent (not idle). */
  all: number;
  busy: number;
  qemuSource: number;
  qemuDestination: number;
}

/** Runs `work` (a migration of `pair`), counting the machine's CPU and its QEMUs' over it. */
export async function accounted<T>(pair: VmPair, work: () => Promise<T>): Promise<{ result: T; machine: MachineAccount }> {
  const qemus = [pair.source.proc, pair.destination.proc];
  const before = await Promise.all(qemus.map(cpuSecondsOf));
  const machineBefore = await machineCpuSeconds();
  const started = performance.now();
  const result = await work();
  const wallMs = performance.now() - started;
  const machineAfter = await machineCpuSeconds();
  const after = await Promise.all(qemus.map(cpuSecondsOf));
  return {
    result,
    machine: {
      wallMs,
      all: machineAfter.all - machineBefore.all,
      busy: machineAfter.busy - machineBefore.busy,
      qemuSource: after[0]! - before[0]!,
      qemuDestination: after[1]! - before[1]!,
    },
  };
}

/** One sgm migration's account, with what its two roles spent by their own reports. */
export interface SgmAccount {
  machine: MachineAccount;
  scatterCpu: number;
  gatherCpu: number;
  streamBytes: number;
}

/**
 * Prints, as medians, what the machine and each process spent during QEMU's
 * own migrations and sgm's, and the time the cores would need for sgm's
 * were both roles at `floor` CPU seconds per GiB of the stream.
 */
export function printMachineAccounts(qemu: MachineAccount[], sgm: SgmAccount[], floor: number, qemuMs: number): void {
  const cores = cpus().length;
  const row = (how: string, list: MachineAccount[], roles: number[]) => {
    const busy = median(list.map((m) => m.busy));
    const [source, destination] = [median(list.map((m) => m.qemuSource)), median(list.map((m) => m.qemuDestination))];
    const cells = [
      `${Math.round(median(list.map((m) => m.wallMs)))} ms`,
      `${Math.round(median(list.map((m) => (100 * m.busy) / m.all)))}%`,
      busy.toFixed(2),
      source.toFixed(2),
      destination.toFixed(2),
      ...(roles.length > 0 ? roles.map((x) => x.toFixed(2)) : ["", ""]),
      (busy - source - destination - roles.reduce((a, b) => a + b, 0)).toFixed(2),
    ];
    console.log(`| ${how} | ${cells.join(" | ")} |`);
  };
  const ours = sgm.map((r) => r.machine);
  console.log(`\nWhat the machine's ${cores} cores spent, CPU seconds (medians; wall is the whole run, setting up included: sgm's from starting the gather to both reports)\n`);
  console.log("| migration | wall | cores busy | CPU s in all | QEMU source | QEMU destination | scatter | gather | the rest |");
  console.log("|---|---|---|---|---|---|---|---|---|");
  row("QEMU's own precopy", qemu, []);
  row("sgm direct", ours, [median(sgm.map((r) => r.scatterCpu)), median(sgm.map((r) => r.gatherCpu))]);
  const gib = median(sgm.map((r) => r.streamBytes)) / 2 ** 30;
  const qemus = median(ours.map((m) => m.qemuSource)) + median(ours.map((m) => m.qemuDestination));
  const boundMs = ((qemus + 2 * floor * gib) / cores) * 1000;
  console.log(
    `\nWith the QEMUs as they ran beside sgm and both roles at the floor (${floor.toFixed(2)} CPU s per GiB each), ${cores} cores finish sgm direct in no less than ${Math.round(boundMs)} ms: ${(boundMs / qemuMs).toFixed(1)}x QEMU's own.`,
  );
}

/** The middle of `xs` (the upper one of two), as the benchmarks report their runs. */
export function median(xs: number[]): number {
  return [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
}
