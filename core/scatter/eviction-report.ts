// What scatter reports of each VM's eviction (the JSON report's vms[]; its
// schema is in cli/report-schemas.ts).

import { TPS } from "../qemu/constants.ts";
import type { PipelineStats } from "./page-pipeline.ts";

export type SwitchoverMode = "precopy" | "postcopy";

export interface EvictionReport {
  name: string;
  ok: boolean;
  error?: string;
  qemu: { source: string; destination: string | null; machine: string };
  /** How the source switched over: converged in precopy, or switched to postcopy. */
  switchover: SwitchoverMode | null;
  /** From scatter's start until this VM began to migrate: its wait for a slot (evacuate --max-in-flight); null if it never began. */
  queuedMs: number | null;
  /** From scatter's start until every byte of the final state was held off the source. */
  evictionMs: number | null;
  /** Source STOP to destination RESUME. */
  downtimeMs: number | null;
  /** From scatter's start until the destination completed, if it did while scatter ran. */
  totalMs: number | null;
  /** Where the source VM is now: quit, paused (--keep-source), running (eviction failed). */
  source: string;
  /** Precopy passes the source made in its last stream (its MIGRATION_PASS events). */
  passes: number;
  /** Bytes per second the source's switchover decision was told to assume (QEMU 8.2 and later); null if it was not. */
  switchoverBandwidth: number | null;
  /** Times the source streamed its memory: more than 1 when a lost relay had it stream again. */
  sourceStreams: number;
  /** Times a postcopy source was paused and resumed to send again what a lost relay took. */
  sourceResumes: number;
  bytes: { fromSource: number; dedupSaved: number };
  pages: PipelineStats & { requestedFromSource: number };
  /** The exit code this VM's failure maps to. */
  exitCode?: number;
}

/** What one eviction notes as it goes, for its report and progress; times from performance.now() unless said. */
export class EvictionRecord {
  destinationQemu: string | null = null;
  /** When run() began (before, the VM waits for a slot: see eviction-slots.ts). */
  startedAt: number | null = null;
  /** Every byte of the VM was held off the source. */
  evictedAt: number | null = null;
  /** The source's STOP and the destination's RESUME, as the QEMUs' events say (Date.now() clocks). */
  stoppedAt: number | null = null;
  resumedAt: number | null = null;
  /** The destination completed (Date.now()). */
  completedAt: number | null = null;
  passes = 0;
  switchoverBandwidth: number | null = null;
  streamsBegun = 0;
  resumes = 0;

  report(r: {
    name: string;
    error: { message: string; exitCode: number } | undefined;
    source: { qemuVersion: string; machine: string; state: string; bytesRead: number; requestedFromSource: number };
    switchover: SwitchoverMode | null;
    runStartedAt: { mono: number; wall: number };
    pages: PipelineStats;
  }): EvictionReport {
    const since = (at: number | null, start: number) => (at === null ? null : Math.round(at - start));
    const { error, source } = r;
    return {
      name: r.name,
      ok: error === undefined,
      ...(error ? { error: error.message } : {}),
      qemu: { source: source.qemuVersion, destination: this.destinationQemu, machine: source.machine },
      switchover: r.switchover,
      queuedMs: since(this.startedAt, r.runStartedAt.mono),
      evictionMs: since(this.evictedAt, r.runStartedAt.mono),
      downtimeMs: this.stoppedAt !== null ? since(this.resumedAt, this.stoppedAt) : null,
      totalMs: since(this.completedAt, r.runStartedAt.wall),
      source: source.state,
      passes: this.passes,
      switchoverBandwidth: this.switchoverBandwidth,
      sourceStreams: this.streamsBegun,
      sourceResumes: this.resumes,
      bytes: { fromSource: source.bytesRead, dedupSaved: r.pages.dedupPages * TPS },
      pages: { ...r.pages, requestedFromSource: source.requestedFromSource },
      ...(error ? { exitCode: error.exitCode } : {}),
    };
  }
}
