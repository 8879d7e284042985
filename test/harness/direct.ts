// QEMU's own migration, source QEMU straight to destination QEMU over a unix
// socket: the baseline sgm is measured against, and a check that the test
// guest and memory comparison work at all.

import { join } from "node:path";
import type { QmpEvent } from "../../core/qmp/client.ts";
import { queryMigrate, setCapabilities, setParameters, waitForMigrationStatus } from "../../core/qmp/migration.ts";
import type { TestVm } from "./qemu.ts";

export interface DirectMigrationResult {
  totalMs: number;
  /** Source STOP to destination RESUME, from the two QEMUs' event timestamps. */
  downtimeMs: number;
  /** What the source QEMU itself reports as downtime. */
  qemuDowntimeMs: number;
  transferredBytes: number;
}

function eventMs(event: QmpEvent): number {
  return event.timestamp.seconds * 1000 + event.timestamp.microseconds / 1000;
}

export async function migrateDirect(
  source: TestVm,
  destination: TestVm,
  dir: string,
  options: { maxBandwidth?: number; timeoutMs?: number } = {},
): Promise<DirectMigrationResult> {
  const socket = join(dir, `${source.name}-to-${destination.name}.mig`);
  const timeoutMs = options.timeoutMs ?? 300_000;
  await setCapabilities(destination.qmp, { events: true });
  await destination.qmp.execute("migrate-incoming", { uri: `unix:${socket}` });
  await setCapabilities(source.qmp, { events: true });
  if (options.maxBandwidth) await setParameters(source.qmp, { "max-bandwidth": options.maxBandwidth });

  const stop = source.qmp.waitForEvent("STOP", undefined, timeoutMs);
  const resume = destination.qmp.waitForEvent("RESUME", undefined, timeoutMs);
  const started = performance.now();
  await source.qmp.execute("migrate", { uri: `unix:${socket}` });
  await waitForMigrationStatus(destination.qmp, ["completed"], timeoutMs, "destination");
  const totalMs = performance.now() - started;
  await waitForMigrationStatus(source.qmp, ["completed"], timeoutMs, "source");
  const info = await queryMigrate(source.qmp);
  const [stopped, resumed] = await Promise.all([stop, resume]);
  return {
    totalMs,
    downtimeMs: eventMs(resumed) - eventMs(stopped),
    qemuDowntimeMs: info.downtime ?? 0,
    transferredBytes: info.ram?.transferred ?? 0,
  };
}
