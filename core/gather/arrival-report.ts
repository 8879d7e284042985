// What the gather reports of each VM (the JSON report's vms[]; its schema
// is in cli/report-schemas.ts), and where an arrival stands for the
// progress display.

import type { SgmError } from "../errors.ts";
import type { Phase } from "../progress.ts";
import { type FeedStats, newFeedStats } from "./feed-stats.ts";

export interface ArrivalReport {
  name: string;
  ok: boolean;
  error?: string;
  exitCode?: number;
  qemu: { source: string | null; destination: string; machine: string };
  /** From scatter's start until the destination completed. */
  totalMs: number | null;
  /** Source STOP to destination RESUME. */
  downtimeMs: number | null;
  bytes: { toQemu: number };
  pages: FeedStats & { total: number };
}

export type ArrivalStage = "waiting" | "offered" | "streaming" | "source-done" | "switching" | "running" | "completed" | "failed";

export function arrivalPhase(stage: ArrivalStage): Phase {
  switch (stage) {
    case "waiting":
    case "offered":
      return "checking";
    case "streaming":
      return "gathering";
    case "source-done":
    case "switching":
      return "switchover";
    case "running":
      return "running";
    case "completed":
      return "done";
    case "failed":
      return "failed";
  }
}

export function arrivalReport(r: {
  name: string;
  ok: boolean;
  error: SgmError | null;
  qemu: ArrivalReport["qemu"];
  /** Date.now() clocks, as the QEMUs' events and the scatter's start say them. */
  times: { startedAt: number | null; stoppedAt: number | null; resumedAt: number | null; completedAt: number | null };
  bytesToQemu: number;
  totalPages: number;
  stats: FeedStats | null;
}): ArrivalReport {
  const { startedAt, stoppedAt, resumedAt, completedAt } = r.times;
  const stats = r.stats ?? newFeedStats();
  return {
    name: r.name,
    ok: r.ok,
    ...(r.error ? { error: r.error.message, exitCode: r.error.exitCode } : {}),
    qemu: r.qemu,
    totalMs: completedAt !== null && startedAt !== null ? Math.round(completedAt - startedAt) : null,
    downtimeMs: resumedAt !== null && stoppedAt !== null ? Math.round(resumedAt - stoppedAt) : null,
    bytes: { toQemu: r.bytesToQemu },
    pages: {
      total: r.totalPages,
      fedPages: stats.fedPages,
      discardedPages: stats.discardedPages,
      deliveredPages: stats.deliveredPages,
      requests: stats.requests,
      requestedPagesServed: stats.requestedPagesServed,
      requestedFromRelays: stats.requestedFromRelays,
      requestedFromSource: stats.requestedFromSource,
    },
  };
}
