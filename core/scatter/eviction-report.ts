// What scatter reports of each VM's eviction (the JSON report's vms[]; its
// schema is in cli/report-schemas.ts).

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
  /** Times the source streamed its memory: more than 1 when a lost relay had it stream again. */
  sourceStreams: number;
  /** Times a postcopy source was paused and resumed to send again what a lost relay took. */
  sourceResumes: number;
  bytes: { fromSource: number; dedupSaved: number };
  pages: PipelineStats & { requestedFromSource: number };
  /** The exit code this VM's failure maps to. */
  exitCode?: number;
}
