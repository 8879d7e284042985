// One migration stream of a source QEMU into scatter: the socket it
// connects to, the migrate command, and the stream read up to its end,
// paused while the pages cannot go anywhere. An eviction makes a second
// attempt only when a lost relay had the source stream again
// (vm-eviction.ts): what the first told the gather, a second must repeat.

import { SgmError } from "../errors.ts";
import { ByteSocket } from "../net/byte-socket.ts";
import { encodeShut } from "../qemu/return-path.ts";
import type { RamBlockInfo } from "../qemu/stream-reader.ts";
import type { PagePipeline } from "./page-pipeline.ts";
import type { RunPlacement } from "./placement.ts";
import type { SourceQemu } from "./source-qemu.ts";
import { SourceStream } from "./source-stream.ts";
import { trace } from "../trace.ts";

export interface AttemptOptions {
  name: string;
  source: SourceQemu;
  pipeline: PagePipeline;
  placement: RunPlacement;
  socketPath: string;
  downtimeLimitMs?: number;
  postcopy: boolean;
  /** Why the eviction failed, if it has: nothing more is to be started. */
  failure: () => Error | null;
  /** The stream's header and RAM blocks, the first time; null after (they are checked against the first). */
  first: { header: Uint8Array; blocks: string } | null;
  /** The source has been told to migrate (it connects next). */
  onMigrating(): void;
  onHeader(bytes: Uint8Array): void;
  onBlocks(blocks: readonly RamBlockInfo[], sectionId: number): void;
  onPostcopy(): void;
}

export class SourceAttempt {
  sock: ByteSocket | null = null;
  /** Bytes read by sockets before this one (a postcopy source resumed). */
  private readBefore = 0;
  stream: SourceStream | null = null;
  header: Uint8Array | null = null;
  blocks: string | null = null;
  private readonly o: AttemptOptions;
  /** The socket throttle() paused, until placement has room again. */
  private throttledSock: ByteSocket | null = null;
  /** Reading stopped to drop the stream safely (holdForDetach): throttling must not start it again. */
  private held = false;

  constructor(options: AttemptOptions) {
    this.o = options;
  }

  get bytesRead(): number {
    return this.readBefore + (this.sock?.bytesRead ?? 0);
  }

  /** Has the source migrate into the socket, and resolves once it is connected. */
  async connect(): Promise<SourceStream> {
    const listening = ByteSocket.listenUnixOnce(this.o.socketPath, `VM ${this.o.name}: source stream`);
    try {
      await this.o.source.migrateTo(this.o.socketPath, { downtimeLimitMs: this.o.downtimeLimitMs, postcopy: this.o.postcopy });
      this.throwIfFailed();
      this.o.onMigrating();
      const sock = await acceptWithin(listening, 30_000);
      const failure = this.o.failure();
      if (failure) {
        // the eviction failed before there was a socket to drop: QEMU's migration fails with it
        sock.destroy(failure);
        throw failure;
      }
      this.sock = sock;
      this.stream = this.read(sock);
      return this.stream;
    } catch (err) {
      // nobody is to connect any more: a QEMU that still tries fails its migration and runs on
      listening.stop();
      void listening.accepted.then((sock) => sock.destroy(), () => {});
      throw err;
    }
  }

  /**
   * A source in postcopy sends again what a relay lost: its stream is
   * dropped (QEMU pauses its postcopy), it resumes into a new socket at
   * `path` and sends the pages its received bitmaps mark (see
   * SourceStream.resumeOn). Resolves once it has resumed.
   */
  async resumePaused(path: string): Promise<void> {
    const stream = this.stream!;
    if (!(await this.holdForDetach())) {
      throw new SgmError("unavailable", `VM ${this.o.name}: its source is completing its postcopy (or did not show it is not), and its stream cannot be dropped to send pages again`);
    }
    // the eviction failed meanwhile: letGo decides what becomes of the stream
    const failure = this.o.failure();
    if (failure) {
      this.release();
      throw failure;
    }
    this.detach();
    await this.o.source.waitFor(["postcopy-paused"], 30_000);
    // failed meanwhile: the source stays paused, its memory whole
    this.throwIfFailed();
    const listening = ByteSocket.listenUnixOnce(path, `VM ${this.o.name}: resumed source stream`);
    try {
      await this.o.source.resumeInto(path);
      const sock = await acceptWithin(listening, 30_000);
      this.sock = sock;
      const timeout = setTimeout(() => sock.destroy(new SgmError("unavailable", `VM ${this.o.name}: the resumed source did not finish its handshake in 60 s`)), 60_000);
      await stream.resumeOn(sock).finally(() => clearTimeout(timeout));
    } catch (err) {
      listening.stop();
      void listening.accepted.then((sock) => sock.destroy(), () => {});
      throw err;
    }
  }

  private detach(): void {
    this.readBefore += this.sock?.bytesRead ?? 0;
    this.sock = null;
    this.held = false;
    this.stream!.detach();
  }

  /**
   * Stops reading the source and proves that dropping its stream now
   * pauses its postcopy (postcopy-paused) instead of failing it: QEMU
   * starts the VM again after a failed migration (migration_iteration_finish),
   * even a postcopy one whose destination runs it. Safe while its migration
   * thread is blocked writing RAM in an iteration: past postcopy_start's
   * last check (its PING after the package read), and not in
   * migration_completion, which begins only when nothing is left to send
   * (downtime-limit 0, see SourceQemu.startPostcopy) and writes under the
   * big lock. Three prompt query-migrate answers 200 ms apart, all
   * postcopy-active with the same RAM remaining above nought, while scatter
   * reads nothing, show QEMU blocked there. True with reading still
   * stopped; false with reading going again.
   */
  private async holdForDetach(): Promise<boolean> {
    const sock = this.sock;
    const stream = this.stream;
    if (!sock || !stream || stream.complete) return false;
    // just after the switch the PING may not be read yet: reading goes on meanwhile
    const reading = () => this.sock === sock && sock.isOpen && !stream.complete;
    for (const until = performance.now() + 10_000; !stream.pastSwitchCheck && performance.now() < until && reading(); ) {
      sock.resume();
      await Bun.sleep(50);
    }
    if (!stream.pastSwitchCheck || !reading()) {
      this.release();
      return false;
    }
    this.held = true;
    sock.pause();
    let same = 0;
    let last = -1;
    const until = performance.now() + 10_000;
    while (performance.now() < until && !stream.complete) {
      const state = await this.o.source.sendingState(2_000);
      if (state === null || state.status !== "postcopy-active" || state.remaining === 0) break;
      same = state.remaining === last ? same + 1 : 0;
      if (same === 2) return true;
      last = state.remaining;
      await Bun.sleep(200);
    }
    this.release();
    return false;
  }

  /** Reading goes on after holdForDetach. */
  private release(): void {
    this.held = false;
    if (!this.sock) return;
    if (this.throttledSock === this.sock) this.sock.pause();
    else this.sock.resume();
  }

  /**
   * The eviction failed after the source switched to postcopy: the
   * destination may run the VM, so the source must not. Dropped while that
   * pauses its postcopy (holdForDetach); otherwise read to its end, pages
   * dropped, and told SHUT, so that it completes and stays stopped
   * (postmigrate). Resolves with the source's migration status.
   */
  async letGo(): Promise<string> {
    const stream = this.stream;
    const sock = this.sock;
    // dropped to resume (resumePaused), or closed by QEMU: QEMU's own state tells
    if (!stream || !sock?.isOpen) return (await this.o.source.sendingState(2_000))?.status ?? "unknown";
    stream.discardPages();
    if (!stream.complete && (await this.holdForDetach())) return this.dropToPaused();
    // the stream must not break before QEMU completes (QEMU 10.0 would run the VM again): waited for without bound
    let ended = false;
    let broken = false;
    const ending = stream.ended.then(
      () => (ended = true),
      () => (broken = true),
    );
    for (;;) {
      sock.resume();
      await Promise.race([ending, Bun.sleep(60_000)]);
      if (ended || broken || !sock.isOpen) break;
      if (!stream.complete && (await this.holdForDetach())) return this.dropToPaused();
      trace(`${this.o.name}: the source's stream has not ended after a minute; still reading it to its end`);
    }
    if (!ended) return (await this.o.source.sendingState(2_000))?.status ?? "unknown";
    sock.write(encodeShut(0));
    return this.o.source.waitFor(["completed"], 30_000).catch(() => "unknown");
  }

  /** After holdForDetach: the stream dropped, the source's postcopy pauses. */
  private dropToPaused(): Promise<string> {
    this.detach();
    return this.o.source.waitFor(["postcopy-paused"], 30_000).catch(() => "unknown");
  }

  /** Drops the stream: the source's migration fails. */
  destroy(reason?: Error): void {
    this.sock?.destroy(reason);
  }

  private read(sock: ByteSocket): SourceStream {
    const o = this.o;
    return new SourceStream(o.name, sock, o.pipeline, {
      onHeader: (bytes) => {
        this.header = bytes.slice();
        if (!o.first) o.onHeader(bytes);
        else if (!Buffer.from(bytes).equals(o.first.header)) throw new SgmError("data", `VM ${o.name}: the source's stream header changed when it streamed again`);
      },
      onBlocks: (blocks, sectionId) => {
        this.blocks = JSON.stringify({ sectionId, blocks });
        if (!o.first) o.onBlocks(blocks, sectionId);
        else if (this.blocks !== o.first.blocks) throw new SgmError("data", `VM ${o.name}: the source named other RAM blocks when it streamed again`);
      },
      afterPage: () => {
        if (o.placement.congested || o.pipeline.backlogged) this.throttle();
      },
      onPostcopy: () => o.onPostcopy(),
    });
  }

  private throwIfFailed(): void {
    const failure = this.o.failure();
    if (failure) throw failure;
  }

  /** Stops reading the source until the gather or a relay takes pages again: memory stays bounded. */
  private throttle(): void {
    const sock = this.sock;
    if (!sock || this.throttledSock === sock) return;
    this.throttledSock = sock;
    sock.pause();
    void (async () => {
      const { placement, pipeline } = this.o;
      while (placement.congested || pipeline.backlogged) {
        await placement.whenUncongested();
        await pipeline.whenRoom();
      }
      if (this.throttledSock === sock) this.throttledSock = null;
      if (!this.held && this.sock === sock) sock.resume();
    })();
  }
}

/** The one connection `listening` waits for, or its "nobody connected" error after `ms`. */
function acceptWithin(listening: ReturnType<typeof ByteSocket.listenUnixOnce>, ms: number): Promise<ByteSocket> {
  const timer = setTimeout(listening.stop, ms);
  return listening.accepted.finally(() => clearTimeout(timer));
}
