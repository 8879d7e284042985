// Drives a source QEMU over QMP for an eviction: checks that its migration
// setup is one sgm can carry, points its migration at scatter's socket, and
// follows it to the end, or cancels it so the VM keeps running.

import { SgmError } from "../errors.ts";
import type { VmEstimate } from "./relay-plan.ts";
import { checkSupported, hasSwitchoverBandwidth, machineType, versionString } from "../qemu/versions.ts";
import { type QmpAddress, QmpClient, type QmpEvent, describeQmpAddress } from "../qmp/client.ts";
import {
  enabledCapabilities,
  type MigrationStatus,
  queryMigrate,
  setCapabilities,
  setParameters,
  waitForMigrationStatus,
} from "../qmp/migration.ts";

/** Capabilities that change the stream into something sgm does not parse. */
const REFUSED_CAPABILITIES: Record<string, string> = {
  xbzrle: "XBZRLE-encoded pages",
  compress: "compressed pages",
  multifd: "extra multifd channels",
  "mapped-ram": "file-only mapped RAM",
  "postcopy-preempt": "a second postcopy channel",
  "x-colo": "COLO",
  block: "block migration sections",
  "dirty-bitmaps": "dirty bitmap sections",
  "x-ignore-shared": "shared RAM left out of the stream",
  "switchover-ack": "switchover acknowledgements",
  "background-snapshot": "snapshot mode",
  "zero-copy-send": "zero-copy multifd",
};

/**
 * QEMU's default downtime-limit is 300 ms. Into scatter, which absorbs at
 * local speed, QEMU then stops the VM with 300 ms worth of that speed still
 * to send; 50 ms cut the measured downtime to a third with no later eviction
 * (1 GiB idle: 329 -> 109 ms; 256 MiB at 20k dirty pages/s: 210 -> 54 ms).
 */
export const DEFAULT_DOWNTIME_LIMIT_MS = 50;

const ACTIVE: ReadonlySet<string> = new Set(["setup", "active", "postcopy-active", "device", "pre-switchover", "cancelling", "wait-unplug"]);

export interface SourceInfo {
  qemuVersion: string;
  machine: string;
  runState: string;
}

export class SourceQemu {
  readonly name: string;
  readonly qmp: QmpClient;
  readonly info: SourceInfo;
  private stopEvent: Promise<QmpEvent> | null = null;

  private constructor(name: string, qmp: QmpClient, info: SourceInfo) {
    this.name = name;
    this.qmp = qmp;
    this.info = info;
  }

  /** Connects and checks that the VM can be migrated by sgm right now. */
  static async open(name: string, address: QmpAddress): Promise<SourceQemu> {
    const qmp = await QmpClient.connect(address).catch((err: SgmError) => {
      throw new SgmError("unavailable", `VM ${name}: ${err.message}`);
    });
    try {
      checkSupported(qmp.version, `VM ${name}: the source`);
      const status = await qmp.execute<{ status: string }>("query-status");
      if (status.status === "inmigrate") throw new SgmError("usage", `VM ${name}: QEMU at ${describeQmpAddress(address)} is a migration destination, not a source`);
      if (status.status === "postmigrate") throw new SgmError("usage", `VM ${name}: already migrated away (run state postmigrate)`);
      const migration = await queryMigrate(qmp);
      if (migration.status && ACTIVE.has(migration.status)) {
        throw new SgmError("unavailable", `VM ${name}: a migration is already ${migration.status}`);
      }
      const enabled = await enabledCapabilities(qmp);
      for (const cap of enabled) {
        const why = REFUSED_CAPABILITIES[cap];
        if (why) throw new SgmError("usage", `VM ${name}: migration capability '${cap}' is on (${why}); sgm needs it off`);
      }
      const params = await qmp.execute<Record<string, unknown>>("query-migrate-parameters");
      if (typeof params["tls-creds"] === "string" && params["tls-creds"] !== "") {
        throw new SgmError("usage", `VM ${name}: migration TLS is configured (tls-creds); sgm carries plain streams`);
      }
      return new SourceQemu(name, qmp, { qemuVersion: versionString(qmp.version), machine: await machineType(qmp), runState: status.status });
    } catch (err) {
      qmp.close();
      throw err;
    }
  }

  /**
   * What QEMU can tell, before it migrates, of the RAM it will send: its
   * size, less what a balloon has taken back (sent as zero pages). Zero
   * pages in the guest cannot be known until QEMU reads them.
   */
  async estimate(): Promise<VmEstimate> {
    const memory = await this.qmp.execute<{ "base-memory": number; "plugged-memory"?: number }>("query-memory-size-summary");
    const ramBytes = memory["base-memory"] + (memory["plugged-memory"] ?? 0);
    // without a balloon device QEMU answers with an error: nothing is ballooned
    const balloon = await this.qmp.execute<{ actual: number }>("query-balloon").catch(() => null);
    return { name: this.name, ramBytes, balloonedBytes: balloon ? Math.max(0, ramBytes - balloon.actual) : 0 };
  }

  /**
   * Starts the migration into scatter's unix socket. The return path is on,
   * so the source waits for scatter's SHUT before it calls the migration
   * complete: until then, losing scatter fails the migration and QEMU
   * resumes the VM.
   */
  async migrateTo(socketPath: string, options: { downtimeLimitMs?: number; postcopy?: boolean } = {}): Promise<void> {
    const downtimeLimit = options.downtimeLimitMs ?? DEFAULT_DOWNTIME_LIMIT_MS;
    await setCapabilities(this.qmp, { events: true, "return-path": true, "postcopy-ram": options.postcopy ?? false });
    // QEMU's default cap of 128 MiB/s is far below what scatter absorbs.
    await setParameters(this.qmp, {
      "max-bandwidth": 64 * 1024 * 1024 * 1024,
      "downtime-limit": downtimeLimit,
      // a rate told to an earlier stream of this VM (setSwitchoverBandwidth) is not this one's
      ...(hasSwitchoverBandwidth(this.qmp.version) ? { "avail-switchover-bandwidth": 0 } : {}),
    });
    this.stopEvent = this.qmp.waitForEvent("STOP", undefined, 24 * 3600 * 1000);
    this.stopEvent.catch(() => {}); // observed through stoppedAt()
    await this.qmp.execute("migrate", { uri: `unix:${socketPath}` });
  }

  /** Resumes a postcopy paused when its stream broke (QEMU's postcopy recovery), into scatter's socket at `socketPath`. */
  async resumeInto(socketPath: string): Promise<void> {
    await this.qmp.execute("migrate", { uri: `unix:${socketPath}`, resume: true });
  }

  /**
   * Tells QEMU the rate scatter takes its stream at, for its switchover
   * decision only (it limits nothing); false where QEMU (before 8.2) has no
   * such setting. QEMU otherwise judges by the bytes it wrote in its last
   * 100 ms or more, and once it only resends what the guest dirtied, those
   * are few: a zero page is 9 bytes of stream but 4 KiB of what it has left,
   * and a window that spans a wait on scatter holds little. Its threshold
   * (that rate times downtime-limit) can then stay below what the guest
   * dirties between two syncs, and it syncs again and again without
   * switching over: 30 passes within 3 s, once in 17 runs of the soak's
   * two-VM evacuation, a guest dirtying 9 MiB/s into 81 MiB/s.
   */
  async setSwitchoverBandwidth(bytesPerSecond: number): Promise<boolean> {
    if (!hasSwitchoverBandwidth(this.qmp.version)) return false;
    await setParameters(this.qmp, { "avail-switchover-bandwidth": Math.max(1, Math.round(bytesPerSecond)) });
    return true;
  }

  /** Calls `listener` with each pass number the source reports (MIGRATION_PASS). */
  onPass(listener: (pass: number) => void): () => void {
    return this.qmp.onEvent((event) => {
      if (event.event === "MIGRATION_PASS") listener(Number(event.data.pass));
    });
  }

  /** Pages per second the guest dirties, as QEMU measures it during precopy. */
  async dirtyPageRate(): Promise<number | null> {
    const info = await queryMigrate(this.qmp);
    return info.ram?.["dirty-pages-rate"] ?? null;
  }

  /**
   * The migration's status and the RAM bytes it has still to send, or null
   * when QEMU does not answer within `timeoutMs` (its migration thread may
   * hold the big lock while it completes).
   */
  async sendingState(timeoutMs: number): Promise<{ status: MigrationStatus | undefined; remaining: number } | null> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<null>((resolve) => (timer = setTimeout(() => resolve(null), timeoutMs)));
    const answer = queryMigrate(this.qmp).then((info) => ({ status: info.status, remaining: info.ram?.remaining ?? 0 }), () => null);
    return Promise.race([answer, late]).finally(() => clearTimeout(timer));
  }

  /** Has the source switch to postcopy: it stops the VM and sends the device state now. */
  async startPostcopy(): Promise<void> {
    // QEMU completes a postcopy once less than downtime-limit's worth is left;
    // with none allowed, only once nothing is, so that until then its stream
    // can be dropped to pause it (SourceAttempt.holdForDetach)
    await setParameters(this.qmp, { "downtime-limit": 0 });
    await this.qmp.execute("migrate-start-postcopy");
  }

  /** Wall-clock time (epoch ms) of the STOP that ends the source's run. */
  async stoppedAt(): Promise<number> {
    if (!this.stopEvent) throw new SgmError("internal", "stoppedAt before migrateTo");
    const event = await this.stopEvent;
    return event.timestamp.seconds * 1000 + event.timestamp.microseconds / 1000;
  }

  waitFor(statuses: readonly MigrationStatus[], timeoutMs: number): Promise<MigrationStatus> {
    return waitForMigrationStatus(this.qmp, statuses, timeoutMs, `VM ${this.name}: source migration`);
  }

  /**
   * Makes sure the VM runs here again after a failed eviction: cancels the
   * migration if it is still going, and resumes the VM if it was running
   * before. Only for evictions whose destination never got the go to run:
   * resuming here is then safe even after QEMU called its migration done.
   */
  async resumeHere(): Promise<string> {
    if (!this.qmp.isOpen) return "unknown";
    const info = await queryMigrate(this.qmp).catch(() => null);
    if (info?.status && ACTIVE.has(info.status)) {
      await this.qmp.execute("migrate_cancel").catch(() => {});
      await waitForMigrationStatus(this.qmp, ["cancelled", "failed", "completed"], 30_000).catch(() => {});
    }
    const status = await this.qmp.execute<{ status: string }>("query-status");
    if (this.info.runState === "running" && status.status !== "running") {
      await this.qmp.execute("cont");
      return "running";
    }
    return status.status;
  }

  async quit(): Promise<void> {
    await this.qmp.execute("quit").catch(() => {});
    this.qmp.close();
  }

  close(): void {
    this.qmp.close();
  }
}
