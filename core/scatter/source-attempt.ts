// One migration stream of a source QEMU into scatter: the socket it
// connects to, the migrate command, and the stream read up to its end,
// paused while the pages cannot go anywhere. An eviction makes a second
// attempt only when a lost relay had the source stream again
// (vm-eviction.ts): what the first told the gather, a second must repeat.

import { SgmError } from "../errors.ts";
import { ByteSocket } from "../net/byte-socket.ts";
import type { RamBlockInfo } from "../qemu/stream-reader.ts";
import type { PagePipeline } from "./page-pipeline.ts";
import type { RunPlacement } from "./placement.ts";
import type { SourceQemu } from "./source-qemu.ts";
import { SourceStream } from "./source-stream.ts";

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
  stream: SourceStream | null = null;
  header: Uint8Array | null = null;
  blocks: string | null = null;
  private readonly o: AttemptOptions;
  private throttled = false;

  constructor(options: AttemptOptions) {
    this.o = options;
  }

  get bytesRead(): number {
    return this.sock?.bytesRead ?? 0;
  }

  /** Has the source migrate into the socket, and resolves once it is connected. */
  async connect(): Promise<SourceStream> {
    const listening = ByteSocket.listenUnixOnce(this.o.socketPath, `VM ${this.o.name}: source stream`);
    try {
      await this.o.source.migrateTo(this.o.socketPath, { downtimeLimitMs: this.o.downtimeLimitMs, postcopy: this.o.postcopy });
      this.throwIfFailed();
      this.o.onMigrating();
      const timer = setTimeout(listening.stop, 30_000);
      const sock = await listening.accepted.finally(() => clearTimeout(timer));
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
    if (!sock || this.throttled) return;
    this.throttled = true;
    sock.pause();
    void (async () => {
      const { placement, pipeline } = this.o;
      while (placement.congested || pipeline.backlogged) {
        await placement.whenUncongested();
        await pipeline.whenRoom();
      }
      this.throttled = false;
      sock.resume();
    })();
  }
}
