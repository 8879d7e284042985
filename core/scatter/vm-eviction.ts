// One VM's eviction, on the source host: scatter becomes the migration
// target of the source QEMU, reads its stream at local speed and passes the
// pages on. The switchover is a handshake, so a VM never runs in two places
// and is never lost:
//
//   source done ─▶ gather: "source-done"   (all pages and the device state sent)
//   gather ─▶ "switch-ready"               (it holds everything: the VM is evicted)
//   scatter ─▶ SHUT to the source QEMU     (its migration completes; the VM stays stopped)
//   scatter ─▶ "switch-go"                 (from here on, the VM may run at the destination)
//   gather ─▶ "running"                    (it does)
//
// Any failure before switch-go leaves the VM running at the source: scatter
// drops the migration socket, so QEMU fails the migration and resumes the VM.

import { join } from "node:path";
import { asSgmError, SgmError } from "../errors.ts";
import { trace } from "../trace.ts";
import { ByteSocket } from "../net/byte-socket.ts";
import { Command, commandName } from "../qemu/constants.ts";
import { encodePong, encodeShut } from "../qemu/return-path.ts";
import { MigrationStreamReader } from "../qemu/stream-reader.ts";
import type { QmpAddress } from "../qmp/client.ts";
import type { PeerConnection } from "../wire/connection.ts";
import { type Control, encodeControl, encodeVmBytes, FrameType, MAX_VM_BYTES, VmBytesKind } from "../wire/messages.ts";
import { PagePipeline, type PipelineStats } from "./page-pipeline.ts";
import type { RunPlacement } from "./placement.ts";
import { SourceQemu } from "./source-qemu.ts";

export interface EvictionReport {
  name: string;
  ok: boolean;
  error?: string;
  qemu: { source: string; destination: string | null; machine: string };
  /** From scatter's start until the gather held every byte of the final state. */
  evictionMs: number | null;
  /** Source STOP to destination RESUME. */
  downtimeMs: number | null;
  /** From scatter's start until the destination completed, if it did while scatter ran. */
  totalMs: number | null;
  /** Where the source VM is now: quit, paused (--keep-source), running (eviction failed). */
  source: string;
  bytes: { fromSource: number; dedupSaved: number };
  pages: PipelineStats;
  /** The exit code this VM's failure maps to. */
  exitCode?: number;
}

export interface EvictionOptions {
  id: number;
  name: string;
  source: SourceQemu;
  conn: PeerConnection;
  placement: RunPlacement;
  socketDir: string;
  /** performance.now() and Date.now() at scatter's start. */
  startedAt: { mono: number; wall: number };
  keepSource: boolean;
  downtimeLimitMs?: number;
  log: (line: string) => void;
}

type Stage = "offered" | "streaming" | "source-done" | "evicted" | "go" | "running" | "failed";

export class VmEviction {
  readonly id: number;
  readonly name: string;
  private readonly options: EvictionOptions;
  private readonly source: SourceQemu;
  private readonly conn: PeerConnection;
  private readonly pipeline: PagePipeline;
  private stage: Stage = "offered";
  private sock: ByteSocket | null = null;
  private throttled = false;
  private destinationQemu: string | null = null;
  private evictedAt: number | null = null;
  private stoppedAt: number | null = null;
  private resumedAt: number | null = null;
  private completedAt: number | null = null;
  private readonly replies = new Map<Control["t"], PromiseWithResolvers<Control>>();
  private readonly failed = Promise.withResolvers<never>();

  constructor(options: EvictionOptions) {
    this.options = options;
    this.id = options.id;
    this.name = options.name;
    this.source = options.source;
    this.conn = options.conn;
    this.pipeline = new PagePipeline(options.id, options.placement);
    this.failed.promise.catch(() => {});
    options.placement.onFailure((reason) => this.fail(reason));
  }

  static async openSource(name: string, address: QmpAddress): Promise<SourceQemu> {
    return SourceQemu.open(name, address);
  }

  /** A control message from the gather about this VM. */
  onControl(message: Control): void {
    if (message.t === "failed" || message.t === "refuse") {
      this.fail(new SgmError("unavailable", `VM ${this.name}: gather: ${message.reason}`));
      return;
    }
    if (message.t === "completed") this.completedAt = message.completedAt;
    this.reply(message.t).resolve(message);
  }

  /** The connection to the gather is gone. */
  onDisconnect(reason: Error | undefined): void {
    this.fail(new SgmError("unavailable", `VM ${this.name}: lost the gather${reason ? `: ${reason.message}` : ""}`));
  }

  fail(reason: Error): void {
    if (this.stage === "failed" || this.stage === "running") return;
    this.failed.reject(reason);
  }

  async run(): Promise<EvictionReport> {
    const o = this.options;
    let error: SgmError | undefined;
    let sourceState = "running";
    try {
      await this.race(this.offerAndStream());
      // The gather holds every byte of the final state: evicted.
      await this.race(this.wait("switch-ready"));
      this.evictedAt = performance.now();
      trace(`${this.name} switch-ready: evicted`);
      this.stage = "evicted";
      o.log(`${this.name}: evicted in ${Math.round(this.evictedAt - o.startedAt.mono)} ms; switching over`);
      await this.race(this.completeSource());
      this.stage = "go";
      trace(`${this.name} source completed; switch-go`);
      this.send({ t: "switch-go", vm: this.id });
      const running = await this.race(this.wait("running"));
      if (running.t === "running") this.resumedAt = running.resumedAt;
      this.stage = "running";
      sourceState = o.keepSource ? "paused" : "quit";
      if (!o.keepSource) await this.source.quit();
      o.log(`${this.name}: running at the destination; source ${sourceState}`);
    } catch (err) {
      error = asSgmError(err);
      sourceState = await this.undo(error);
    } finally {
      this.sock?.destroy();
      this.pipeline.close();
    }
    const s = this.pipeline.stats;
    return {
      name: this.name,
      ok: error === undefined,
      ...(error ? { error: error.message } : {}),
      qemu: { source: this.source.info.qemuVersion, destination: this.destinationQemu, machine: this.source.info.machine },
      evictionMs: this.evictedAt === null ? null : Math.round(this.evictedAt - o.startedAt.mono),
      downtimeMs: this.stoppedAt !== null && this.resumedAt !== null ? Math.round(this.resumedAt - this.stoppedAt) : null,
      totalMs: this.completedAt === null ? null : Math.round(this.completedAt - o.startedAt.wall),
      source: sourceState,
      bytes: { fromSource: this.sock?.bytesRead ?? 0, dedupSaved: s.dedupPages * 4096 },
      pages: { ...s },
      ...(error ? { exitCode: error.exitCode } : {}),
    };
  }

  /** Throws the reason if this eviction fails meanwhile. */
  private race<T>(promise: Promise<T>): Promise<T> {
    return Promise.race([promise, this.failed.promise]);
  }

  private async offerAndStream(): Promise<void> {
    const o = this.options;
    const info = this.source.info;
    this.send({ t: "offer", vm: this.id, name: this.name, qemu: info.qemuVersion, machine: info.machine, startedAt: o.startedAt.wall });
    const accept = await this.wait("accept");
    if (accept.t === "accept") this.destinationQemu = accept.qemu;

    const path = join(o.socketDir, `${this.name}.scatter.sock`);
    const listening = ByteSocket.listenUnixOnce(path, `VM ${this.name}: source stream`);
    await this.source.migrateTo(path, { downtimeLimitMs: o.downtimeLimitMs });
    const timer = setTimeout(listening.stop, 30_000);
    const sock = await listening.accepted.finally(() => clearTimeout(timer));
    this.sock = sock;
    this.stage = "streaming";
    trace(`${this.name} source stream accepted`);
    o.log(`${this.name}: source QEMU ${this.source.info.qemuVersion} is streaming`);

    const streamDone = Promise.withResolvers<Uint8Array>();
    const reader = new MigrationStreamReader({
      onHeader: (bytes) => this.conn.send(FrameType.VM_BYTES, encodeVmBytes(this.id, VmBytesKind.HEADER, true, bytes)),
      onRamBlocks: (blocks) => this.send({ t: "blocks", vm: this.id, sectionId: reader.ramSection, blocks: [...blocks] }),
      onPage: (block, page, data) => {
        this.pipeline.page(block, page, data);
        if (o.placement.congested) this.throttle();
      },
      onRamSectionEnd: () => this.pipeline.flush(),
      onCommand: (cmd, payload) => {
        if (cmd === Command.PING) sock.write(encodePong(new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0)));
        else if (cmd !== Command.OPEN_RETURN_PATH && cmd !== Command.SWITCHOVER_START) {
          throw new SgmError("data", `VM ${this.name}: unexpected ${commandName(cmd)} in a precopy stream`);
        }
      },
      onPackaged: () => {
        throw new SgmError("data", `VM ${this.name}: PACKAGED in a precopy stream`);
      },
      onEof: () => {
        throw new SgmError("data", `VM ${this.name}: postcopy EOF in a precopy stream`);
      },
      onDeviceState: (bytes) => {
        trace(`${this.name} device state read (${bytes.length} bytes)`);
        this.pipeline.flush();
        streamDone.resolve(bytes.slice());
      },
    });
    sock.setDataHandler((data) => reader.feed(data));
    void sock.closed.then((reason) => {
      if (!reader.isComplete) {
        streamDone.reject(reason ?? new SgmError("unavailable", `VM ${this.name}: the source QEMU closed its stream early`));
      }
    });
    const device = await streamDone.promise;
    // every page named to the gather must be held before the device state follows
    await this.pipeline.whenAllSent();
    trace(`${this.name} every page held; device state and source-done to the gather (${this.conn.queuedBytes} bytes queued, ${this.options.placement.directInFlight} direct in flight)`);
    for (let at = 0; at < device.length || at === 0; at += MAX_VM_BYTES) {
      const part = device.subarray(at, at + MAX_VM_BYTES);
      this.conn.send(FrameType.VM_BYTES, encodeVmBytes(this.id, VmBytesKind.DEVICE_STATE, at + MAX_VM_BYTES >= device.length, part));
    }
    this.stoppedAt = await this.withTimeout(this.source.stoppedAt(), 10_000, "no STOP event from the source QEMU");
    this.stage = "source-done";
    this.send({ t: "source-done", vm: this.id, stoppedAt: this.stoppedAt });
  }

  /** SHUT lets the source QEMU call its migration done; it stays stopped, holding its state. */
  private async completeSource(): Promise<void> {
    this.sock!.write(encodeShut(0));
    await this.source.waitFor(["completed"], 30_000);
  }

  /** Stops reading the source until the gather or a relay takes pages again: memory stays bounded. */
  private throttle(): void {
    const sock = this.sock;
    if (!sock || this.throttled) return;
    this.throttled = true;
    sock.pause();
    void this.options.placement.whenUncongested().then(() => {
      this.throttled = false;
      sock.resume();
    });
  }

  /** After a failure: the VM must run at the source unless the destination may run it. */
  private async undo(error: SgmError): Promise<string> {
    const mayRunThere = this.stage === "go";
    this.stage = "failed";
    this.sock?.destroy(error);
    this.send({ t: "failed", vm: this.id, reason: error.message });
    if (mayRunThere) {
      this.options.log(`${this.name}: switchover was under way when this failed; the source stays paused`);
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
    try {
      this.conn.send(FrameType.CONTROL, encodeControl(message));
    } catch {
      // a closed connection surfaces through onDisconnect
    }
  }

  private reply(type: Control["t"]): PromiseWithResolvers<Control> {
    let r = this.replies.get(type);
    if (!r) {
      r = Promise.withResolvers<Control>();
      this.replies.set(type, r);
    }
    return r;
  }

  private wait(type: Control["t"]): Promise<Control> {
    return this.reply(type).promise;
  }

  private async withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new SgmError("unavailable", `VM ${this.name}: ${what}`)), ms);
    });
    try {
      return await Promise.race([promise, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }
}
