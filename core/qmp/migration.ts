// Migration-related QMP commands and the MIGRATION event stream, shared by
// every role that drives a QEMU (scatter's source, gather's destination,
// and the test bench's direct migrations).

import { SgmError } from "../errors.ts";
import type { QmpClient } from "./client.ts";

export type MigrationStatus =
  | "none"
  | "setup"
  | "cancelling"
  | "cancelled"
  | "active"
  | "postcopy-active"
  | "postcopy-paused"
  | "postcopy-recover"
  | "postcopy-device"
  | "completed"
  | "failed"
  | "colo"
  | "pre-switchover"
  | "device"
  | "wait-unplug";

export interface MigrationInfo {
  status?: MigrationStatus;
  "total-time"?: number;
  downtime?: number;
  "setup-time"?: number;
  "error-desc"?: string;
  ram?: {
    transferred: number;
    total: number;
    remaining: number;
    duplicate: number;
    normal: number;
    "dirty-sync-count": number;
    "dirty-pages-rate": number;
    mbps: number;
  };
}

export async function setCapabilities(qmp: QmpClient, capabilities: Record<string, boolean>): Promise<void> {
  await qmp.execute("migrate-set-capabilities", {
    capabilities: Object.entries(capabilities).map(([capability, state]) => ({ capability, state })),
  });
}

export async function setParameters(qmp: QmpClient, parameters: Record<string, unknown>): Promise<void> {
  await qmp.execute("migrate-set-parameters", parameters);
}

export async function queryMigrate(qmp: QmpClient): Promise<MigrationInfo> {
  return qmp.execute<MigrationInfo>("query-migrate");
}

export async function enabledCapabilities(qmp: QmpClient): Promise<Set<string>> {
  const caps = await qmp.execute<Array<{ capability: string; state: boolean }>>("query-migrate-capabilities");
  return new Set(caps.filter((c) => c.state).map((c) => c.capability));
}

const TERMINAL: ReadonlySet<MigrationStatus> = new Set(["completed", "failed", "cancelled"]);

/**
 * Resolves with the first of `wanted` the migration reaches. Fails if the
 * migration ends in a status not wanted. Needs the `events` capability on;
 * query-migrate is polled as well, so a status reached before the call (or
 * an event lost with a reconnect) is still seen.
 */
export function waitForMigrationStatus(
  qmp: QmpClient,
  wanted: readonly MigrationStatus[],
  timeoutMs: number,
  what = "migration",
): Promise<MigrationStatus> {
  return new Promise((resolve, reject) => {
    let finished = false;
    const finish = (err: Error | null, status?: MigrationStatus) => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      clearInterval(poll);
      off();
      if (err) reject(err);
      else resolve(status!);
    };
    const consider = (status: MigrationStatus | undefined, detail?: string) => {
      if (!status) return;
      if (wanted.includes(status)) finish(null, status);
      else if (TERMINAL.has(status)) {
        finish(new SgmError("unavailable", `${what} ended '${status}'${detail ? `: ${detail}` : ""} while waiting for ${wanted.join("/")}`));
      }
    };
    const off = qmp.onEvent((event) => {
      if (event.event !== "MIGRATION") return;
      const status = event.data.status as MigrationStatus;
      if (TERMINAL.has(status) && !wanted.includes(status)) {
        // ask for the error text before failing
        queryMigrate(qmp).then((info) => consider(status, info["error-desc"]), () => consider(status));
      } else consider(status);
    });
    // one question at a time: QEMU queues what a blocked main loop has yet to answer
    let asking = false;
    const check = () => {
      if (asking) return;
      asking = true;
      queryMigrate(qmp)
        .then((info) => consider(info.status, info["error-desc"]), (err: Error) => finish(err))
        .finally(() => (asking = false));
    };
    const poll = setInterval(check, 500);
    const timer = setTimeout(
      () => finish(new SgmError("unavailable", `${what}: not ${wanted.join("/")} within ${timeoutMs} ms`)),
      timeoutMs,
    );
    void qmp.closed.then(() => finish(new SgmError("unavailable", `${what}: QMP closed while waiting for ${wanted.join("/")}`)));
    void check();
  });
}
