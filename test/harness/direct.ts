// QEMU's own migration, source QEMU straight to destination QEMU: the
// baseline sgm is measured against (pre-copy, or post-copy switched after
// the first pass), and a check that the test guest and memory comparison
// work at all.

import { join } from "node:path";
import type { QmpClient, QmpEvent } from "../../core/qmp/client.ts";
import { queryMigrate, setCapabilities, setParameters, waitForMigrationStatus } from "../../core/qmp/migration.ts";
import type { TestVm } from "./qemu.ts";

export interface DirectMigrationResult {
  /** Start to the destination's completion: it holds every page. */
  totalMs: number;
  /** Start to the source's completion: the source host is free of the VM. */
  evictionMs: number;
  /** Source STOP to destination RESUME, from the two QEMUs' event timestamps. */
  downtimeMs: number;
  /** What the source QEMU itself reports as downtime. */
  qemuDowntimeMs: number;
  transferredBytes: number;
}

export interface DirectOptions {
  /** QEMU's max-bandwidth; by default its own 128 MiB/s. */
  maxBandwidth?: number;
  /** A migration still going after this is cancelled and fails; one still copying "did not converge". */
  timeoutMs?: number;
  /** Where the destination listens; by default a unix socket in `dir`. */
  uri?: string;
  /** Switch to post-copy once the first pass has gone, as post-copy is usually run. */
  postcopy?: boolean;
  /** Called as the source completes. */
  onSourceCompleted?: () => void;
}

function eventMs(event: QmpEvent): number {
  return event.timestamp.seconds * 1000 + event.timestamp.microseconds / 1000;
}

export async function migrateDirect(source: TestVm, destination: TestVm, dir: string, options: DirectOptions = {}): Promise<DirectMigrationResult> {
  const uri = options.uri ?? `unix:${join(dir, `${source.name}-to-${destination.name}.mig`)}`;
  const timeoutMs = options.timeoutMs ?? 300_000;
  const capabilities = { events: true, "postcopy-ram": options.postcopy ?? false };
  await setCapabilities(destination.qmp, capabilities);
  await destination.qmp.execute("migrate-incoming", { uri });
  await setCapabilities(source.qmp, capabilities);
  if (options.maxBandwidth) await setParameters(source.qmp, { "max-bandwidth": options.maxBandwidth });

  const stop = source.qmp.waitForEvent("STOP", undefined, timeoutMs);
  const resume = destination.qmp.waitForEvent("RESUME", undefined, timeoutMs);
  // a migration given up leaves these unawaited
  stop.catch(() => {});
  resume.catch(() => {});
  const started = performance.now();
  await source.qmp.execute("migrate", { uri });
  try {
    if (options.postcopy) await switchAfterFirstPass(source.qmp, timeoutMs);
    const evicted = waitForMigrationStatus(source.qmp, ["completed"], timeoutMs, `${source.name} source`).then(() => {
      options.onSourceCompleted?.();
      return performance.now();
    });
    const arrived = waitForMigrationStatus(destination.qmp, ["completed"], timeoutMs, `${source.name} destination`).then(() => performance.now());
    arrived.catch(() => {});
    const [evictedAt, arrivedAt, stopped, resumed] = await Promise.all([evicted, arrived, stop, resume]);
    const info = await queryMigrate(source.qmp);
    return {
      totalMs: arrivedAt - started,
      evictionMs: evictedAt - started,
      downtimeMs: eventMs(resumed) - eventMs(stopped),
      qemuDowntimeMs: info.downtime ?? 0,
      transferredBytes: info.ram?.transferred ?? 0,
    };
  } catch (err) {
    const status = (await queryMigrate(source.qmp).catch(() => ({ status: "unknown" }))).status;
    await source.qmp.execute("migrate_cancel").catch(() => {});
    if (status === "active") throw new Error(`still copying after ${timeoutMs / 1000} s: it did not converge`);
    throw err;
  }
}

async function switchAfterFirstPass(qmp: QmpClient, limitMs: number): Promise<void> {
  const deadline = performance.now() + limitMs;
  for (;;) {
    const info = await queryMigrate(qmp);
    if ((info.ram?.["dirty-sync-count"] ?? 0) >= 2) break;
    if (info.status === "completed" || info.status === "failed") return;
    if (performance.now() > deadline) throw new Error("the first pass did not end in time");
    await Bun.sleep(20);
  }
  await qmp.execute("migrate-start-postcopy");
}
