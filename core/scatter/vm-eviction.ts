// One VM's eviction, on the source host: scatter becomes the migration
// target of the source QEMU, reads its stream at local speed and passes the
// pages on. The switchover is a handshake, so a VM never runs in two places
// and is never lost.
//
// Precopy switchover (the source converges into scatter):
//   source done ─▶ gather: "source-done"   (all pages and the device state sent)
//   gather ─▶ "switch-ready"               (it holds everything: the VM is evicted)
//   scatter ─▶ SHUT to the source QEMU     (its migration completes; the VM stays stopped)
//   scatter ─▶ "switch-go"                 (from here on, the VM may run at the destination)
//   gather ─▶ "running"                    (it does)
// Any failure before switch-go leaves the VM running at the source: scatter
// drops the migration socket, so QEMU fails the migration and resumes it.
//
// A relay lost with the only copy of content this VM's map names, before
// switch-go, has the source stream again (precopy only: a postcopy source
// sends no page twice): scatter drops the stream, the gather forgets the
// device state ("source-restarted", "restarted"), QEMU resumes the VM (from
// its migration failed, or completed but not yet run elsewhere) and
// migrates it once more. Its first pass sends every page, and what is
// still held goes as a reference alone.
//
// Postcopy switchover (the source stops the VM early and sends each
// remaining page once): the source's discards mark pages pending, its
// PACKAGED carries the device state; scatter sends it with
// "source-switched", the gather answers "switch-ready", and switch-go
// follows at once. Pages keep coming from the source, the destination's
// requests for pending ones travel back to it, and when the source's stream
// ends and every page is held ("source-done", "held") the VM is evicted.

import { join } from "node:path";
import { asSgmError, SgmError } from "../errors.ts";
import { TPS } from "../qemu/constants.ts";
import { encodeShut } from "../qemu/return-path.ts";
import { formatBytes, formatRate } from "../units.ts";
import { trace } from "../trace.ts";
import type { PeerConnection } from "../wire/connection.ts";
import type { Control } from "../wire/control.ts";
import { encodeVmBytes, FrameType, MAX_VM_BYTES, VmBytesKind } from "../wire/messages.ts";
import type { DigestPool } from "../dedup/digest-pool.ts";
import type { Phase, VmProgress } from "../progress.ts";
import { type EvictionReport, EvictionRecord, type SwitchoverMode } from "./eviction-report.ts";
import { PagePipeline } from "./page-pipeline.ts";
import type { RunPlacement } from "./placement.ts";
import type { SourceQemu } from "./source-qemu.ts";
import type { SwitchPoint } from "./source-stream.ts";
import { GatherReplies } from "./gather-replies.ts";
import { SourceAttempt } from "./source-attempt.ts";

export interface EvictionOptions {
  id: number;
  name: string;
  source: SourceQemu;
  conn: PeerConnection;
  placement: RunPlacement;
  /** Threads that hash the pages, shared by the run's VMs; null to hash on this one. */
  digestPool: DigestPool | null;
  socketDir: string;
  /** performance.now() and Date.now() at scatter's start. */
  startedAt: { mono: number; wall: number };
  keepSource: boolean;
  downtimeLimitMs?: number;
  mode: SwitchoverMode;
  /** In postcopy mode: switch after this many precopy passes (0: at once). */
  postcopyAfterPass: number;
  /** In precopy mode: give up (the VM runs on at the source) when the source starts a pass beyond this. */
  maxPasses: number;
  log: (line: string) => void;
}


type Stage = "offered" | "streaming" | "switching" | "restarting" | "source-postcopy" | "go" | "running" | "failed";

/** Thrown through raceOrRestart(): the source must stream again (see the top of this file). */
class SourceRestart extends Error {}

export class VmEviction {
  readonly id: number;
  readonly name: string;
  private readonly options: EvictionOptions;
  private readonly source: SourceQemu;
  private readonly conn: PeerConnection;
  private readonly pipeline: PagePipeline;
  private stage: Stage = "offered";
  /** The gather refused or failed this VM itself. */
  private gatherGaveUp = false;
  /**
   * The gather has said all this VM needed of it: in precopy that the VM
   * runs there, in postcopy that it holds every page (and, for its going to
   * be ignored, that the destination completed: a gather that crashed
   * before that leaves the VM to `gather --resume`, which must be told).
   * Then a gather that goes changes nothing at the source, whose
   * completion is all that is left.
   */
  private gatherPartOver = false;
  /** run() is over: nothing can fail any more. */
  private finished = false;
  /** The source's stream now; null before it starts. */
  private current: SourceAttempt | null = null;
  private switchover: SwitchoverMode | null = null;
  private readonly record = new EvictionRecord();
  private readonly gather: GatherReplies;
  private readonly failed = Promise.withResolvers<never>();
  private failureReason: SgmError | null = null;
  /** Rejected with a SourceRestart when a relay took content this VM still needs; renewed on each restart. */
  private restart = Promise.withResolvers<never>();
  private attempt = 1;
  /** Source bytes read by streams before this one. */
  private readBefore = 0;
  /** The source was asked to switch to postcopy: it may no longer resume the VM. */
  private postcopyAsked = false;
  private migratingSince = 0;
  /** What the first stream told the gather; a stream again must say the same. */
  private first: { header: Uint8Array; blocks: string } | null = null;
  private passListener: (() => void) | null = null;
  /** A postcopy source being paused and resumed (resumeSource); `resumeAgain` when another loss came meanwhile. */
  private resuming: Promise<void> | null = null;
  private resumeAgain = false;
  /** A relay's loss heard while the source was asked to switch to postcopy, to answer once it has (switchSettled). */
  private lostWhileSwitching: string | null = null;

  constructor(options: EvictionOptions) {
    this.options = options;
    this.id = options.id;
    this.name = options.name;
    this.source = options.source;
    this.conn = options.conn;
    this.gather = new GatherReplies(options.conn, options.name);
    this.pipeline = new PagePipeline(options.id, options.placement, options.digestPool);
    this.failed.promise.catch(() => {});
    this.restart.promise.catch(() => {});
    options.placement.onFailure((reason) => this.fail(reason));
    options.placement.onContentLost((why) => this.contentLost(why));
  }

  /**
   * A relay went with the only copy of some content. If this VM's map names
   * any, it is not evicted yet, and its source can resume it, the source
   * streams again; if the source cannot, the VM fails. A stream about to
   * start again sends every page anyway.
   */
  private contentLost(why: string): void {
    // once evicted (in precopy, from switch-go on) the gather answers for it: see the crash table in the README
    if (this.finished || this.failureReason || this.record.evictedAt !== null || this.stage === "restarting") return;
    if (!this.pipeline.namesLostContent()) return;
    const canStreamAgain = (this.stage === "streaming" || this.stage === "switching") && this.switchover !== "postcopy" && !this.postcopyAsked;
    if (canStreamAgain) {
      this.restart.reject(new SourceRestart(why));
      return;
    }
    const stream = this.current?.stream;
    if (this.switchover === "postcopy" && stream && !stream.complete) {
      this.resumeSource(why);
      return;
    }
    if (this.switchover === null && this.postcopyAsked) {
      // asked to switch: which way it went decides (switched, or converged or refused first)
      this.lostWhileSwitching = why;
      return;
    }
    this.fail(new SgmError("unavailable", `VM ${this.name}: ${why}; its source has sent its last page, and cannot send those pages again`));
  }

  /** The source's switch to postcopy was settled: a loss heard meanwhile is answered now. */
  private switchSettled(): void {
    const why = this.lostWhileSwitching;
    this.lostWhileSwitching = null;
    if (why !== null) this.contentLost(why);
  }

  /**
   * A postcopy source sends the lost pages again: paused and resumed
   * (SourceAttempt.resumePaused); again if another relay goes meanwhile.
   */
  private resumeSource(why: string): void {
    if (this.resuming) {
      this.resumeAgain = true;
      return;
    }
    this.resuming = (async () => {
      let reason = why;
      for (;;) {
        this.resumeAgain = false;
        this.record.resumes++;
        this.options.log(`${this.name}: ${reason}; the source's postcopy pauses and resumes to send those pages again`);
        await this.current!.resumePaused(join(this.options.socketDir, `${this.name}.scatter.resume${this.record.resumes}.sock`));
        trace(`${this.name} source resumed (${this.record.resumes})`);
        if (!this.resumeAgain || !this.pipeline.namesLostContent() || this.current!.stream!.complete) return;
        reason = "another relay went";
      }
    })()
      .catch((err: unknown) => this.fail(asSgmError(err)))
      .finally(() => {
        this.resuming = null;
      });
  }

  /** A control message from the gather about this VM. */
  onControl(message: Control): void {
    // replies to a failed eviction must not carry on what it had begun
    if (this.failure || this.finished) return;
    if (message.t === "failed" || message.t === "refuse") {
      const kind = message.t === "failed" && message.kind === "data" ? "data" : "unavailable";
      // the gather knows: telling it back would name a VM it refused or gave up
      this.gatherGaveUp = true;
      this.fail(new SgmError(kind, `VM ${this.name}: gather: ${message.reason}`));
      return;
    }
    if (message.t === "want") {
      this.current?.stream?.ask(message.block, message.page);
      return;
    }
    if (message.t === "completed") this.record.completedAt = message.completedAt;
    this.gather.resolve(message);
  }

  /** The connection to the gather is gone. */
  onDisconnect(reason: Error | undefined): void {
    if (this.finished) return;
    if (this.gatherPartOver && (this.switchover === "precopy" || this.record.completedAt !== null)) {
      this.options.log(`${this.name}: the gather left${reason ? ` (${reason.message})` : ""} once its part was over`);
      return;
    }
    this.fail(new SgmError("unavailable", `VM ${this.name}: lost the gather${reason ? `: ${reason.message}` : ""}`));
  }

  fail(reason: Error): void {
    if (this.failureReason || this.stage === "failed" || this.finished) return;
    this.failureReason = asSgmError(reason);
    this.failed.reject(reason);
  }

  /** Why it failed, once it has: what run() was racing on may still be under way, and must stop. */
  get failure(): SgmError | null {
    return this.failureReason;
  }

  /** It has pages to place or content to name still: not yet evicted, failed or over (nor begun, if it waits for a slot). */
  get placing(): boolean {
    return !this.finished && this.stage !== "failed" && this.failureReason === null && this.record.evictedAt === null;
  }

  /** Settles with the reason once it fails; never, if it does not. */
  get failing(): Promise<SgmError> {
    return this.failed.promise.catch((err: unknown) => asSgmError(err));
  }

  /** Where this eviction stands, for the progress display. */
  snapshot(): VmProgress {
    return { name: this.name, phase: this.phase(), pass: this.record.passes, bytes: this.bytesRead, totalBytes: this.pipeline.totalBytes };
  }

  private get bytesRead(): number {
    return this.readBefore + (this.current?.bytesRead ?? 0);
  }

  private phase(): Phase {
    if (this.stage === "failed") return "failed";
    if (this.finished) return "done";
    if (this.record.evictedAt !== null) return this.stage === "running" ? "running" : "evicted";
    // the VM runs at the destination while a postcopy source still sends
    if (this.stage === "go" || this.stage === "running") return "scattering";
    if (this.stage === "switching" || this.stage === "source-postcopy") return "switchover";
    if (this.stage === "streaming" || this.stage === "restarting") return "precopy";
    return this.record.startedAt === null ? "queued" : "checking";
  }

  /**
   * The VM never started (the run was stopped or failed while it waited for
   * a slot): nothing was asked of its source or the gather, so it is as it
   * was at the source.
   */
  skip(reason: SgmError): EvictionReport {
    this.stage = "failed";
    this.finished = true;
    this.pipeline.close();
    return this.report(reason, this.source.info.runState);
  }

  async run(): Promise<EvictionReport> {
    this.record.startedAt = performance.now();
    const o = this.options;
    let error: SgmError | undefined;
    let sourceState = "running";
    try {
      await this.race(this.offerToGather());
      const point = await this.streamUntilGo();
      if (point.kind === "precopy") {
        await this.awaitRunning();
        this.gatherPartOver = true;
      } else await this.switchInPostcopy(point.device);
      sourceState = o.keepSource ? "paused" : "quit";
      if (!o.keepSource) await this.source.quit();
      o.log(`${this.name}: running at the destination; source ${sourceState}`);
      this.finished = true;
    } catch (err) {
      error = asSgmError(err);
      sourceState = await this.undo(error);
    } finally {
      this.finished = true;
      this.current?.destroy();
      this.pipeline.close();
    }
    return this.report(error, sourceState);
  }

  private report(error: SgmError | undefined, sourceState: string): EvictionReport {
    const info = this.source.info;
    return this.record.report({
      name: this.name,
      error,
      source: { qemuVersion: info.qemuVersion, machine: info.machine, state: sourceState, bytesRead: this.bytesRead, requestedFromSource: this.current?.stream?.requestedFromSource ?? 0 },
      switchover: this.switchover,
      runStartedAt: this.options.startedAt,
      pages: this.pipeline.stats,
    });
  }

  /**
   * Streams the source up to its switchover and, in precopy, on until the
   * gather holds everything, the source has completed and switch-go is
   * sent; again whenever a relay takes content the VM needs with it before
   * then.
   */
  private async streamUntilGo(): Promise<SwitchPoint> {
    for (;;) {
      const attempt = this.attempt;
      try {
        const point = await this.raceOrRestart(this.streamFrom());
        this.switchover = point.kind;
        this.postcopyAsked = false;
        this.switchSettled();
        if (point.kind === "postcopy") return point;
        const map = await this.raceOrRestart(this.sendDeviceState(point.device, "source-done", attempt));
        const ready = await this.raceOrRestart(this.wait("switch-ready"));
        this.checkGatherMap(ready, map!);
        const heldAt = performance.now();
        this.current!.sock!.write(encodeShut(0));
        await this.raceOrRestart(this.source.waitFor(["completed"], 30_000));
        // the last moment a relay's loss can send the VM back: the destination may run it from here
        if (this.pipeline.namesLostContent()) throw new SourceRestart("a relay went with content this VM needs while its source completed");
        this.evicted(heldAt);
        trace(`${this.name} source completed; switch-go`);
        this.stage = "go";
        this.send({ t: "switch-go", vm: this.id });
        return point;
      } catch (err) {
        if (!(err instanceof SourceRestart)) throw err;
        await this.race(this.streamAgain(err.message));
      }
    }
  }

  /** Drops the source's stream and has the gather forget what it had of it; QEMU resumes the VM, to migrate it again. */
  private async streamAgain(why: string): Promise<void> {
    this.attempt++;
    this.stage = "restarting";
    this.switchover = null;
    const dropped = this.current!;
    this.current = null;
    this.record.evictedAt = null;
    // a restart comes once pages are named, so after the header and blocks went to the gather
    if (this.first === null && dropped.header && dropped.blocks) this.first = { header: dropped.header, blocks: dropped.blocks };
    this.readBefore += dropped.bytesRead;
    dropped.destroy();
    this.options.log(`${this.name}: ${why}; the source streams its memory again (attempt ${this.attempt})`);
    trace(`${this.name} source-restarted, attempt ${this.attempt}`);
    this.send({ t: "source-restarted", vm: this.id });
    // a switch-ready sent before the gather heard is for the stream dropped
    await this.gather.withTimeout(this.wait("restarted"), 30_000, "the gather did not answer source-restarted");
    this.gather.forget("restarted");
    this.gather.forget("switch-ready");
    const state = await this.source.resumeHere();
    trace(`${this.name} source ${state} again`);
    this.restart = Promise.withResolvers<never>();
    this.restart.promise.catch(() => {});
  }

  /** The source switched to postcopy: the VM runs at the destination at once; pages keep coming. */
  private async switchInPostcopy(device: Uint8Array): Promise<void> {
    await this.race(this.sendDeviceState(device, "source-switched", this.attempt));
    await this.race(this.wait("switch-ready"));
    trace(`${this.name} switch-go while the source still sends`);
    this.stage = "go";
    this.send({ t: "switch-go", vm: this.id });
    await this.awaitRunning();
    await this.race(this.current!.stream!.ended);
    this.pipeline.flush();
    await this.race(this.pipeline.whenAllSent());
    if (this.pipeline.namesLostContent()) {
      throw new SgmError("unavailable", `VM ${this.name}: a relay went with content this VM needs after its source sent its last page; it cannot send it again`);
    }
    const map = this.pipeline.finalMapDigest(this.name);
    this.send({ t: "source-done", vm: this.id, stoppedAt: this.record.stoppedAt!, map });
    const held = await this.race(this.wait("held"));
    this.checkGatherMap(held, map);
    this.gatherPartOver = true;
    this.evicted(performance.now());
    this.current!.sock!.write(encodeShut(0));
    await this.race(this.source.waitFor(["completed"], 30_000));
  }

  /** The gather's final page map must be the one the source sent: otherwise nothing more happens. */
  private checkGatherMap(reply: Control, map: string): void {
    const theirs = reply.t === "switch-ready" || reply.t === "held" ? reply.map : null;
    if (theirs === map) return;
    throw new SgmError("data", `VM ${this.name}: the gather's final page map differs from the source's (digest ${String(theirs).slice(0, 16)} against ${map.slice(0, 16)})`);
  }

  /** Every byte of the VM was held off the source at `at` (performance.now()). */
  private evicted(at: number): void {
    const o = this.options;
    this.record.evictedAt = at;
    trace(`${this.name} every page held: evicted`);
    o.log(`${this.name}: evicted in ${Math.round(this.record.evictedAt - o.startedAt.mono)} ms`);
  }

  private async awaitRunning(): Promise<void> {
    const running = await this.race(this.wait("running"));
    if (running.t === "running") this.record.resumedAt = running.resumedAt;
    this.stage = "running";
  }

  /** Throws the reason if this eviction fails meanwhile. */
  private race<T>(promise: Promise<T>): Promise<T> {
    return Promise.race([promise, this.failed.promise]);
  }

  /** race(), and a SourceRestart if the source must stream again. */
  private raceOrRestart<T>(promise: Promise<T>): Promise<T> {
    return Promise.race([promise, this.failed.promise, this.restart.promise]);
  }

  private async offerToGather(): Promise<void> {
    const info = this.source.info;
    this.send({ t: "offer", vm: this.id, name: this.name, qemu: info.qemuVersion, machine: info.machine, startedAt: this.options.startedAt.wall });
    const accept = await this.wait("accept");
    if (accept.t === "accept") this.record.destinationQemu = accept.qemu;
  }

  /** Starts the source's migration and reads its stream up to the switchover. */
  private async streamFrom(): Promise<SwitchPoint> {
    this.throwIfFailed();
    const o = this.options;
    const postcopy = o.mode === "postcopy";
    this.passListener ??= this.source.onPass((pass) => {
      this.record.passes = pass;
      trace(`${this.name} pass ${pass} began; ${this.bytesRead} bytes read so far`);
      if (pass === 2) void this.tellSwitchoverRate();
      if (postcopy && o.postcopyAfterPass > 0 && pass === o.postcopyAfterPass + 1) void this.switchSourceToPostcopy();
      if (!postcopy && pass > o.maxPasses && this.stage === "streaming") void this.giveUpConverging(this.migratingSince);
    });
    this.migratingSince = performance.now();
    this.record.switchoverBandwidth = null;
    const attempt = new SourceAttempt({
      name: this.name,
      source: this.source,
      pipeline: this.pipeline,
      placement: o.placement,
      socketPath: join(o.socketDir, this.attempt === 1 ? `${this.name}.scatter.sock` : `${this.name}.scatter.${this.attempt}.sock`),
      downtimeLimitMs: o.downtimeLimitMs,
      postcopy,
      failure: () => this.failure,
      first: this.first,
      onMigrating: () => {
        if (postcopy && o.postcopyAfterPass === 0) void this.switchSourceToPostcopy();
      },
      onHeader: (bytes) => this.conn.send(FrameType.VM_BYTES, encodeVmBytes(this.id, VmBytesKind.HEADER, true, bytes)),
      onBlocks: (blocks, sectionId) => this.send({ t: "blocks", vm: this.id, sectionId, blocks: [...blocks] }),
      onPostcopy: () => {
        this.stage = "source-postcopy";
      },
    });
    this.current = attempt;
    const stream = await attempt.connect();
    this.stage = "streaming";
    this.record.streamsBegun++;
    trace(`${this.name} source stream accepted`);
    o.log(`${this.name}: source QEMU ${this.source.info.qemuVersion} is streaming`);
    // a stream dropped to stream again fails as it closes: that is no failure of the eviction
    stream.reached.catch((err: Error) => this.current === attempt && this.fail(err));
    stream.ended.catch((err: Error) => this.current === attempt && this.fail(err));
    return stream.reached;
  }

  /** run() no longer waits on what the caller is doing: it must stop before it touches the source. */
  private throwIfFailed(): void {
    if (this.failure) throw this.failure;
  }

  /**
   * Every page named to the gather is held; then the device state follows,
   * and the word: source-done with the final map's digest (returned), or
   * source-switched while a postcopy source still sends.
   */
  private async sendDeviceState(device: Uint8Array, word: "source-done" | "source-switched", attempt: number): Promise<string | null> {
    await this.pipeline.whenAllSent();
    const stoppedAt = await this.gather.withTimeout(this.source.stoppedAt(), 10_000, "no STOP event from the source QEMU");
    // the stream this belongs to was dropped meanwhile: its device state must not go
    if (attempt !== this.attempt) throw new SourceRestart("the source streams again");
    if (word === "source-done" && this.pipeline.namesLostContent()) {
      // a stream again sends every page QEMU counts as dirty: one it left out (a free page hint) is lost
      throw new SgmError("unavailable", `VM ${this.name}: the source streamed again without some pages whose content a lost relay held; it runs on at the source`);
    }
    this.record.stoppedAt = stoppedAt;
    trace(`${this.name} every page named is held; device state and ${word} to the gather`);
    for (let at = 0; at < device.length || at === 0; at += MAX_VM_BYTES) {
      const part = device.subarray(at, at + MAX_VM_BYTES);
      this.conn.send(FrameType.VM_BYTES, encodeVmBytes(this.id, VmBytesKind.DEVICE_STATE, at + MAX_VM_BYTES >= device.length, part));
    }
    this.stage = "switching";
    if (word === "source-switched") {
      this.send({ t: word, vm: this.id, stoppedAt: this.record.stoppedAt });
      return null;
    }
    const map = this.pipeline.finalMapDigest(this.name);
    this.send({ t: word, vm: this.id, stoppedAt: this.record.stoppedAt, map });
    return map;
  }

  /**
   * The first pass is over: the rate scatter took it at is the rate it
   * takes the rest at, and what the source's switchover decision should
   * assume (see SourceQemu.setSwitchoverBandwidth).
   */
  private async tellSwitchoverRate(): Promise<void> {
    const seconds = (performance.now() - this.migratingSince) / 1000;
    const rate = (this.current?.bytesRead ?? 0) / Math.max(seconds, 0.001);
    try {
      if (!(await this.source.setSwitchoverBandwidth(rate))) return;
      this.record.switchoverBandwidth = Math.round(rate);
      trace(`${this.name} told the source it takes the stream at ${Math.round(rate)} bytes/s`);
    } catch (err) {
      // the source may have completed or failed meanwhile: its own estimate stands
      this.options.log(`${this.name}: switchover rate not taken: ${asSgmError(err).message}`);
    }
  }

  /** Precopy has not converged within --max-passes: the VM stays at the source, with the figures that say why. */
  private async giveUpConverging(since: number): Promise<void> {
    const seconds = (performance.now() - since) / 1000;
    const read = this.current?.bytesRead ?? 0;
    const dirtyPages = await this.source.dirtyPageRate().catch(() => null);
    const dirtying = dirtyPages === null ? "" : `; the guest dirties ${formatRate(dirtyPages * TPS)}`;
    this.fail(
      new SgmError(
        "unconverged",
        `VM ${this.name}: precopy did not converge in ${this.options.maxPasses} passes (${formatBytes(read)} read from the source in ${seconds.toFixed(0)} s, ` +
          `${formatRate(read / Math.max(seconds, 0.001))}${dirtying}); it runs on at the source; evict it with --switchover postcopy`,
      ),
    );
  }

  private async switchSourceToPostcopy(): Promise<void> {
    // a failed eviction resumes the VM at the source: postcopy would leave it nowhere
    if (this.failure || this.stage === "restarting") return;
    // from the ask on, dropping the stream could leave the source in postcopy-paused: no stream again
    this.postcopyAsked = true;
    try {
      await this.source.startPostcopy();
      trace(`${this.name} asked the source to switch to postcopy (pass ${this.record.passes})`);
    } catch (err) {
      // the source may have converged first; then its precopy completion is what follows
      this.postcopyAsked = false;
      this.options.log(`${this.name}: postcopy switch not taken: ${asSgmError(err).message}`);
      this.switchSettled();
    }
  }

  /** After a failure: the VM must run at the source unless the destination may run it. */
  private async undo(error: SgmError): Promise<string> {
    const stage = this.stage;
    this.stage = "failed";
    if (!this.gatherGaveUp) this.send({ t: "failed", vm: this.id, reason: error.message, kind: error.kind });
    const inPostcopy = stage === "source-postcopy" || ((stage === "switching" || stage === "go" || stage === "running") && this.switchover === "postcopy");
    if (inPostcopy) {
      // a resume under way settles first: it stops at the failure
      await this.resuming;
      const status = (await this.current?.letGo()) ?? "unknown";
      this.options.log(`${this.name}: the source had switched to postcopy and cannot resume the VM; it stays paused there (migration ${status})`);
      return "paused";
    }
    this.current?.destroy(error);
    if (stage === "go" || stage === "running") {
      this.options.log(`${this.name}: the destination may be running the VM; the source stays paused`);
      return "paused";
    }
    try {
      const state = await this.source.resumeHere();
      this.options.log(`${this.name}: eviction failed; the VM is ${state} at the source`);
      return state;
    } catch {
      return "unknown";
    }
  }

  private send(message: Control): void {
    this.gather.send(message);
  }

  private wait(type: Control["t"]): Promise<Control> {
    return this.gather.wait(type);
  }
}
