// Drives a destination QEMU over QMP: it must wait with -incoming defer and
// accept postcopy; gather then has it listen on a unix socket of its own and
// follows it until the migration completes.

import { SgmError } from "../errors.ts";
import { checkSupported, machineType, versionString } from "../qemu/versions.ts";
import { type QmpAddress, QmpClient, type QmpEvent, describeQmpAddress } from "../qmp/client.ts";
import { connectHeld, type HolderPlan } from "../qmp/holder-launch.ts";
import { HOLDER_FACTS, type HolderFacts } from "../qmp/monitor-holder.ts";
import { queryMigrate, setCapabilities, waitForMigrationStatus } from "../qmp/migration.ts";

export class DestinationQemu {
  readonly name: string;
  readonly qmp: QmpClient;
  readonly qemuVersion: string;
  readonly machine: string;
  private resumeEvent: Promise<QmpEvent> | null = null;

  private constructor(name: string, qmp: QmpClient, machine: string) {
    this.name = name;
    this.qmp = qmp;
    this.qemuVersion = versionString(qmp.version);
    this.machine = machine;
  }

  /** Connects, through a monitor holder where `holder` says, and checks that this QEMU waits for an incoming migration and can do postcopy. */
  static async open(name: string, address: QmpAddress, holder: HolderPlan | null, log: (line: string) => void): Promise<DestinationQemu> {
    const qmp = await connect(name, address, holder, log);
    try {
      checkSupported(qmp.version, `VM ${name}: the destination`);
      const status = await qmp.execute<{ status: string }>("query-status");
      if (status.status !== "inmigrate") {
        throw new SgmError("usage", `VM ${name}: destination QEMU at ${describeQmpAddress(address)} is '${status.status}', not waiting with -incoming defer`);
      }
      const migration = await queryMigrate(qmp);
      if (migration.status && migration.status !== "none") {
        throw new SgmError("unavailable", `VM ${name}: destination QEMU already has an incoming migration (${migration.status})`);
      }
      // 7.2 checks userfaultfd here: a destination that cannot do postcopy says so now
      await setCapabilities(qmp, { events: true, "postcopy-ram": true }).catch((err: SgmError) => {
        throw new SgmError("unavailable", `VM ${name}: destination QEMU cannot do postcopy: ${err.message}`);
      });
      return new DestinationQemu(name, qmp, await machineType(qmp));
    } catch (err) {
      qmp.close();
      throw err;
    }
  }

  /**
   * For a gather restarted with --resume: connects to a destination whose
   * gather died after switchover. QEMU notices the broken stream and pauses
   * its postcopy; one still 'postcopy-active' gets a moment to notice.
   */
  static async openPaused(name: string, address: QmpAddress, holder: HolderPlan | null, log: (line: string) => void): Promise<{ dest: DestinationQemu; completed: boolean }> {
    const qmp = await connect(name, address, holder, log);
    try {
      checkSupported(qmp.version, `VM ${name}: the destination`);
      // capabilities stay as the first gather set them (events on): none may change during a migration
      let status: string;
      let machine: string;
      if (qmp.held) {
        // QEMU's main loop may wait for a page only a recovery brings: ask the holder, not QEMU
        ({ status, machine } = await heldPaused(qmp, name));
      } else {
        status = (await queryMigrate(qmp)).status ?? "none";
        if (status === "postcopy-active") status = await waitForMigrationStatus(qmp, ["postcopy-paused", "completed"], 30_000, `VM ${name}: destination migration`);
        machine = await machineType(qmp);
      }
      if (status !== "postcopy-paused" && status !== "completed") {
        throw new SgmError("usage", `VM ${name}: destination QEMU's migration is '${status}'; --resume recovers only a postcopy paused when its gather died`);
      }
      return { dest: new DestinationQemu(name, qmp, machine), completed: status === "completed" };
    } catch (err) {
      qmp.close();
      throw err;
    }
  }

  /** Has a paused destination listen for the recovery channel (migrate-recover). */
  async recover(socketPath: string): Promise<void> {
    // out of band where it can be: in band waits for a main loop that may wait for a page
    await this.qmp.execute("migrate-recover", { uri: `unix:${socketPath}` }, { outOfBand: this.qmp.held });
  }

  /** Has QEMU listen for the migration stream on a unix socket. */
  async listen(socketPath: string): Promise<void> {
    this.resumeEvent = this.qmp.waitForEvent("RESUME", undefined, 7 * 24 * 3600 * 1000);
    this.resumeEvent.catch(() => {});
    await this.qmp.execute("migrate-incoming", { uri: `unix:${socketPath}` });
  }

  /**
   * Once the VM runs here: the wall-clock time (epoch ms) of its RESUME; or
   * null once `devicesLoaded` has resolved and QEMU left the VM paused, as a
   * destination started with -S does (the operator starts it).
   */
  async resumedAt(devicesLoaded: Promise<void>): Promise<number | null> {
    const resume = this.resumeEvent;
    if (!resume) throw new SgmError("internal", "resumedAt before listen");
    const asTime = (event: QmpEvent) => event.timestamp.seconds * 1000 + event.timestamp.microseconds / 1000;
    let settled = false;
    const paused = devicesLoaded.then(async () => {
      // POSTCOPY_RUN follows the devices at once: QEMU leaves 'inmigrate' for running, or paused under -S
      for (;;) {
        if (settled) return null;
        const status = await this.qmp.execute<{ status: string }>("query-status");
        if (status.status === "paused") return null;
        if (status.status !== "inmigrate") return asTime(await resume);
        await Bun.sleep(10);
      }
    });
    try {
      return await Promise.race([resume.then(asTime), paused]);
    } finally {
      settled = true;
    }
  }

  async waitCompleted(timeoutMs: number): Promise<void> {
    await waitForMigrationStatus(this.qmp, ["completed"], timeoutMs, `VM ${this.name}: destination migration`);
  }

  /** QEMU's own account of why the incoming migration failed, if it has one. */
  async failureReason(): Promise<string | undefined> {
    if (!this.qmp.isOpen) return "destination QEMU exited";
    const info = await queryMigrate(this.qmp).catch(() => null);
    return info?.["error-desc"];
  }

  close(): void {
    this.qmp.close();
  }
}

async function connect(name: string, address: QmpAddress, holder: HolderPlan | null, log: (line: string) => void): Promise<QmpClient> {
  const connecting = holder
    ? connectHeld(address, holder, (why) => log(`VM ${name}: ${why}; should this gather die after switchover, a --resume may find QEMU's main loop blocked`))
    : QmpClient.connect(address);
  return connecting.catch((err: SgmError) => {
    throw new SgmError("unavailable", `VM ${name}: destination ${err.message}`);
  });
}

/** The holder's account of a migration whose gather died: postcopy-active until QEMU notices, then paused. */
async function heldPaused(qmp: QmpClient, name: string): Promise<{ status: string; machine: string }> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const facts = await qmp.execute<HolderFacts>(HOLDER_FACTS);
    if (facts.migration !== "postcopy-active") return { status: facts.migration, machine: facts.machine };
    if (Date.now() > deadline) throw new SgmError("unavailable", `VM ${name}: destination migration still postcopy-active 30 s after its gather died`);
    await Bun.sleep(20);
  }
}
