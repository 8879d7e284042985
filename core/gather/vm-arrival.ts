// One VM arriving at the destination host: from the scatter's offer to the
// destination QEMU reporting the migration completed.

import { TPS } from "../qemu/constants.ts";
import type { VmProgress } from "../progress.ts";
import { SgmError } from "../errors.ts";
import { trace } from "../trace.ts";
import type { RamBlockInfo } from "../qemu/stream-reader.ts";
import type { Control } from "../wire/control.ts";
import type { ContentDirectory } from "./content-directory.ts";
import { DestinationFeed, type FeedOptions } from "./destination-feed.ts";
import { type ArrivalReport, type ArrivalStage as Stage, arrivalPhase, arrivalReport } from "./arrival-report.ts";
import type { ResumeState } from "./resume-state.ts";
import type { SavedRun } from "./feed-state.ts";
import type { DestinationQemu } from "./destination-qemu.ts";

/** Where and how a VM's state is saved for --resume (feed-state.ts). */
export interface Saving {
  statePath: string | null;
  run: () => SavedRun;
  log: (line: string) => void;
}

/** What a lost relay means for a VM: nothing it lacks, it waits for its source to stream again, or it failed. */
export type LossOutcome = "unharmed" | "waits" | "failed";

export class VmArrival {
  readonly name: string;
  readonly dest: DestinationQemu;
  private stage: Stage = "waiting";
  private feed: DestinationFeed | null = null;
  private header: Uint8Array | null = null;
  private device: Uint8Array[] = [];
  private deviceComplete = false;
  private sourceQemu: string | null = null;
  private startedAt: number | null = null;
  private stoppedAt: number | null = null;
  private resumedAt: number | null = null;
  private completedAt: number | null = null;
  private error: SgmError | null = null;
  private readonly finished = Promise.withResolvers<void>();
  private send: (message: Control) => void = () => {};
  private vmId = -1;
  /** The source runs postcopy: page maps keep coming after the switch. */
  private postcopy = false;
  /** The source's stream has ended: no more page maps. */
  private sourceFinished = false;
  /** The scatter has been sent the last message it waits for ('running', or 'held' from a postcopy source). */
  private readonly told = Promise.withResolvers<void>();

  constructor(dest: DestinationQemu) {
    this.name = dest.name;
    this.dest = dest;
  }

  get isTaken(): boolean {
    return this.stage !== "waiting";
  }

  /** Taken, and neither completed nor failed. */
  get isOpen(): boolean {
    return this.stage !== "waiting" && this.stage !== "completed" && this.stage !== "failed";
  }

  /** Resolves when the VM completed or failed. */
  get done(): Promise<void> {
    return this.finished.promise;
  }

  /** Resolves once no saved state is being written (the write holds pages until then; see feed-state.ts). */
  get stateWritten(): Promise<void> {
    return this.feed?.state.saved ?? Promise.resolve();
  }

  offer(vm: number, message: Extract<Control, { t: "offer" }>, send: (message: Control) => void): void {
    this.vmId = vm;
    this.send = send;
    this.stage = "offered";
    this.sourceQemu = message.qemu;
    this.startedAt = message.startedAt;
    send({ t: "accept", vm, qemu: this.dest.qemuVersion });
  }

  setHeader(bytes: Uint8Array): void {
    if (this.stage === "failed") return; // the scatter learns of it and stops
    if (this.stage !== "offered") throw new SgmError("data", `VM ${this.name}: stream header in stage ${this.stage}`);
    this.header = bytes.slice();
  }

  /** The block list: the destination stream starts. The caller holds frames until this resolves. */
  async start(
    blocks: RamBlockInfo[],
    sectionId: number,
    content: {
      dir: ContentDirectory;
      fetch: (cid: number, urgent: boolean) => void;
      fromSource: (block: number, page: number) => void;
    },
    socketDir: string,
    saving: Saving,
    postcopyBandwidth?: number,
  ): Promise<void> {
    if (this.stage === "failed") return;
    if (this.stage !== "offered" || !this.header) throw new SgmError("data", `VM ${this.name}: block list before the stream header`);
    this.stage = "streaming";
    const feed = new DestinationFeed({
      name: this.name,
      dest: this.dest,
      socketDir,
      header: this.header,
      blocks,
      sectionId,
      dir: content.dir,
      fetch: content.fetch,
      fromSource: content.fromSource,
      postcopyBandwidth,
      ...this.saving(saving),
    });
    this.feed = feed;
    await feed.start();
    void feed.completed.then(
      () => this.complete(),
      (err: Error) => this.fail(err instanceof SgmError ? err : new SgmError("unavailable", err.message)),
    );
  }

  /**
   * A gather restarted with --resume: the VM runs here already, on a
   * postcopy paused when the gather before this one died. First its saved
   * state (checked before QEMU is touched), then resumeFeed().
   */
  claimSaved(
    state: ResumeState,
    content: { dir: ContentDirectory; fetch: (cid: number, urgent: boolean) => void },
    socketDir: string,
    saving: Saving,
    postcopyBandwidth?: number,
  ): void {
    this.stage = "running";
    this.postcopy = true;
    this.sourceFinished = true;
    this.told.resolve(); // no scatter waits
    this.startedAt = state.startedAt;
    this.sourceQemu = state.sourceQemu;
    const feed = new DestinationFeed({
      name: this.name,
      dest: this.dest,
      socketDir,
      header: new Uint8Array(0),
      blocks: state.blocks,
      sectionId: state.sectionId,
      dir: content.dir,
      fetch: content.fetch,
      fromSource: (block, page) => this.fail(new SgmError("internal", `VM ${this.name}: resumed, yet page ${page} of block ${block} is still at the source`)),
      postcopyBandwidth,
      ...this.saving(saving),
    });
    this.feed = feed;
    void feed.completed.then(
      () => this.complete(),
      (err: Error) => this.fail(err instanceof SgmError ? err : new SgmError("unavailable", err.message)),
    );
    try {
      feed.claim(state);
    } catch (err) {
      this.fail(asResumeError(err));
    }
  }

  /** Recovers the destination's postcopy and finishes the migration (after claimSaved). */
  async resumeFeed(): Promise<void> {
    if (!this.isOpen) return;
    try {
      await this.feed!.resume();
    } catch (err) {
      this.fail(asResumeError(err));
    }
  }

  /** A gather restarted with --resume found this VM's migration completed already. */
  completedBefore(): void {
    this.stage = "completed";
    this.finished.resolve();
  }

  private saving(s: Saving): Pick<FeedOptions, "statePath" | "origin" | "log"> {
    return { statePath: s.statePath, log: s.log, origin: () => ({ ...s.run(), startedAt: this.startedAt, sourceQemu: this.sourceQemu }) };
  }

  map(block: number, page: number, id: number): void {
    if (this.stage === "failed") return;
    const feed = this.feed;
    // a postcopy source keeps sending after the switch
    const open = this.stage === "streaming" || (this.postcopy && !this.sourceFinished);
    if (!feed || !open) throw new SgmError("data", `VM ${this.name}: page map in stage ${this.stage}`);
    if (block >= feed.table.blocks.length || page >= feed.table.blocks[block]!.usedLength / 4096) {
      throw new SgmError("data", `VM ${this.name}: page map entry for block ${block} page ${page} outside its RAM`);
    }
    feed.map(block, page, id);
  }

  addDeviceState(bytes: Uint8Array, last: boolean): void {
    if (this.stage === "failed") return;
    if (this.stage !== "streaming" || this.deviceComplete) throw new SgmError("data", `VM ${this.name}: device state in stage ${this.stage}`);
    this.device.push(bytes.slice());
    this.deviceComplete = last;
  }

  /** Every page and the device state have arrived; `map` is the final map's digest as scatter read it. */
  sourceDone(stoppedAt: number, map: string): void {
    if (this.stage === "failed") return;
    if (this.postcopy) {
      // the postcopy source's stream has ended: every page is named, its content held
      if (this.sourceFinished) throw new SgmError("data", `VM ${this.name}: source done twice`);
      this.sourceFinished = true;
      const mine = this.checkFinalMap(map);
      if (!mine) return;
      const feed = this.feed!;
      feed.sourceFinished();
      // the scatter quits the source once it hears: the state must be written first
      void feed.state.saved.then(() => {
        if (this.stage !== "failed") this.send({ t: "held", vm: this.vmId, map: mine });
        this.told.resolve();
      });
      return;
    }
    if (this.stage !== "streaming" || !this.deviceComplete) throw new SgmError("data", `VM ${this.name}: source done without its device state`);
    this.stage = "source-done";
    this.sourceFinished = true;
    const mine = this.checkFinalMap(map);
    if (!mine) return;
    this.feed!.sourceFinished();
    trace(`${this.name} source-done`);
    this.stoppedAt = stoppedAt;
    this.send({ t: "switch-ready", vm: this.vmId, map: mine });
  }

  /** The gather's final map digest if it is scatter's; otherwise the VM fails here and null. */
  private checkFinalMap(theirs: string): string | null {
    try {
      const mine = this.feed!.finalMapDigest();
      if (mine === theirs) return mine;
      throw new SgmError(
        "data",
        `VM ${this.name}: the gather's final page map differs from the source's (digest ${mine.slice(0, 16)} against ${theirs.slice(0, 16)}); ` +
          (this.postcopy ? "the VM runs at the destination on memory that may be wrong" : "the VM keeps running at the source"),
      );
    } catch (err) {
      this.fail(err as SgmError);
      return null;
    }
  }

  /** The source switched to postcopy: the device state is here, pending pages will follow. */
  sourceSwitched(stoppedAt: number): void {
    if (this.stage === "failed") return;
    if (this.stage !== "streaming" || !this.deviceComplete) throw new SgmError("data", `VM ${this.name}: source switched without its device state`);
    this.stage = "source-done";
    this.postcopy = true;
    trace(`${this.name} source-switched`);
    this.stoppedAt = stoppedAt;
    this.send({ t: "switch-ready", vm: this.vmId, map: null });
  }

  /**
   * The scatter dropped the source's stream, which starts again (header and
   * blocks not sent again): its device state and source-done are void.
   */
  sourceRestarted(): void {
    if (this.stage === "failed") return;
    if (this.postcopy || (this.stage !== "streaming" && this.stage !== "source-done")) {
      throw new SgmError("data", `VM ${this.name}: source restarted in stage ${this.stage}`);
    }
    trace(`${this.name} source-restarted`);
    this.stage = "streaming";
    this.device = [];
    this.deviceComplete = false;
    this.sourceFinished = false;
    this.stoppedAt = null;
    this.feed!.sourceRestarted();
    this.send({ t: "restarted", vm: this.vmId });
  }

  async switchGo(): Promise<void> {
    if (this.stage === "failed") return;
    if (this.stage !== "source-done") throw new SgmError("data", `VM ${this.name}: switch-go in stage ${this.stage}`);
    // a relay lost just before switch-go: the destination must not run on memory it cannot complete
    // (a postcopy source still sending can pause and resume, and send those pages again)
    const unreachable = this.postcopy ? 0 : this.feed!.unreachablePages();
    if (unreachable > 0) {
      throw new SgmError("unavailable", `VM ${this.name}: ${unreachable} pages its destination lacks are held nowhere any more (a relay lost); the destination does not run it`);
    }
    this.stage = "switching";
    trace(`${this.name} switch-go`);
    await this.feed!.switchover(Buffer.concat(this.device));
    this.device = [];
    this.resumedAt = await this.feed!.resumedAt();
    // the scatter quits the source once it hears: the state must be written first
    await this.feed!.state.saved;
    if (this.stage === "switching") this.stage = "running";
    this.send({ t: "running", vm: this.vmId, resumedAt: this.resumedAt });
    // a postcopy source's scatter waits for 'held' after this
    if (!this.postcopy) this.told.resolve();
  }

  /**
   * Relays went away (`lost`: a bit each): if they held the only copy of
   * content this VM still owes its destination, it fails, saying how much
   * and what that means for the VM, or waits for its source to send it again.
   */
  relaysLost(address: string, reason: string, lost: number, dir: ContentDirectory): LossOutcome {
    const gone = (c: number) => !dir.isLocal(c) && (dir.relayMask(c) & ~lost) === 0;
    return this.failIfOwed(gone, true, (pages) => `relay ${address} went away (${reason}) with the only copy of ${pages} pages its destination still lacks`);
  }

  /**
   * No live relay holds this content: the VM fails if it still owes it,
   * unless a relay's loss (`relayGone`) is why, which the scatter hears of
   * too: then its source may send it again. A relay that answers it has
   * not what it was said to hold, the scatter never hears of.
   */
  contentUnreachable(cid: number, why: string, relayGone: boolean): LossOutcome {
    return this.failIfOwed((c) => c === cid, relayGone, (pages) => `${why}, and ${pages} pages its destination still lacks have it`);
  }

  /** `relayGone`: the scatter hears of the loss too, and its source may send the content again. */
  private failIfOwed(lacking: (cid: number) => boolean, relayGone: boolean, what: (pages: number) => string): LossOutcome {
    if (!this.feed || !this.isOpen) return "unharmed";
    const pages = this.feed.owedPages(lacking);
    if (pages === 0) return "unharmed";
    // before switch-go a precopy source can stream again, and a postcopy one
    // still sending can pause and resume (the scatter fails the VM if it cannot)
    const sourceCanResend = relayGone && (this.postcopy ? !this.sourceFinished : this.stage === "streaming" || this.stage === "source-done");
    if (sourceCanResend) {
      trace(`${this.name}: ${what(pages)}; waiting for the source to send them again`);
      return "waits";
    }
    const fate = this.feed.runsThere
      ? "the VM runs at the destination, paused (postcopy-paused) until they come, and cannot complete without them"
      : "the VM keeps running at the source";
    this.fail(new SgmError("unavailable", `VM ${this.name}: ${what(pages)}; ${fate}`));
    return "failed";
  }

  /** The scatter is gone: fatal before switchover, and while a postcopy source still owes pages. */
  onScatterLost(reason: string): void {
    if (this.postcopy && !this.sourceFinished) {
      this.fail(new SgmError("unavailable", `VM ${this.name}: scatter went away while the source still had pages to send (${reason})`));
      return;
    }
    if (this.stage === "offered" || this.stage === "streaming" || this.stage === "source-done") {
      this.fail(new SgmError("unavailable", `VM ${this.name}: scatter went away before switchover (${reason})`));
    }
  }

  fail(reason: SgmError): void {
    // nothing more will be told the scatter: a completion waiting on it goes on
    this.told.resolve();
    if (this.stage === "completed" || this.stage === "failed") return;
    // a wrong page may already be in use: the VM must not run on here. Done
    // only once the stop is answered, as the monitor is closed after it
    const stopped =
      reason.kind === "data" && (this.stage === "switching" || this.stage === "running")
        ? this.dest.qmp.execute("stop").then(
            () => {},
            () => {},
          )
        : Promise.resolve();
    this.stage = "failed";
    this.error = reason;
    this.feed?.abort(reason);
    this.send({ t: "failed", vm: this.vmId, reason: reason.message, kind: reason.kind });
    void stopped.then(() => this.finished.resolve());
  }

  /** Where this arrival stands, for the progress display. */
  snapshot(): VmProgress {
    const total = this.feed ? this.feed.table.total * TPS : null;
    return { name: this.name, phase: arrivalPhase(this.stage), pass: 0, bytes: this.feed?.bytesToQemu ?? 0, totalBytes: total };
  }

  report(): ArrivalReport {
    return arrivalReport({
      name: this.name,
      ok: this.stage === "completed",
      error: this.error,
      qemu: { source: this.sourceQemu, destination: this.dest.qemuVersion, machine: this.dest.machine },
      times: { startedAt: this.startedAt, stoppedAt: this.stoppedAt, resumedAt: this.resumedAt, completedAt: this.completedAt },
      bytesToQemu: this.feed?.bytesToQemu ?? 0,
      totalPages: this.feed?.table.total ?? 0,
      stats: this.feed?.stats ?? null,
    });
  }

  private complete(): void {
    if (this.stage === "failed") return;
    this.stage = "completed";
    this.completedAt = Date.now();
    // the gather may exit once every VM is done: not before the scatter heard what it waits for
    void this.told.promise.then(() => {
      this.send({ t: "completed", vm: this.vmId, completedAt: this.completedAt! });
      this.finished.resolve();
    });
  }
}

function asResumeError(err: unknown): SgmError {
  return err instanceof SgmError ? err : new SgmError("unavailable", err instanceof Error ? err.message : String(err));
}
