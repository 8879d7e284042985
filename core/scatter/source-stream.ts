// Reads one source QEMU's migration stream as it arrives and hands every
// page to the page pipeline. It answers the source's PINGs, and keeps what a
// postcopy source still owes: the pages it discarded are pending until it
// sends them again, and one the destination waits for is asked of it on its
// return path (its copy then goes ahead of the rest).
//
// A postcopy source whose stream was dropped (a relay lost content only it
// had sent) resumes on a new socket (resumeOn): it asks for each block's
// received bitmap, and sends again every page marked not received, those
// it still owed and those whose content was lost; the latter only place
// their content again (PagePipeline.refill), their map is unchanged.

import { SgmError } from "../errors.ts";
import type { ByteSocket } from "../net/byte-socket.ts";
import { Command, commandName, TPS } from "../qemu/constants.ts";
import { readDiscard, splitPackage } from "../qemu/postcopy-commands.ts";
import { encodePageRequest, encodePong } from "../qemu/return-path.ts";
import { encodeReceivedBitmap, encodeResumeAck, readRecvBitmapPayload } from "../qemu/postcopy-recovery.ts";
import { MigrationStreamReader, type RamBlockInfo } from "../qemu/stream-reader.ts";
import { trace } from "../trace.ts";
import type { PagePipeline } from "./page-pipeline.ts";
import { settlingFirst } from "./page-run.ts";

/** How the source's stream reached its switchover, with the device state it sent. */
export type SwitchPoint = { kind: "precopy" | "postcopy"; device: Uint8Array };

export interface SourceStreamEvents {
  onHeader(bytes: Uint8Array): void;
  onBlocks(blocks: readonly RamBlockInfo[], sectionId: number): void;
  /** After each page: the caller may pause reading while placement is congested. */
  afterPage(): void;
  /** The source has switched to postcopy: from here on it cannot resume the VM. */
  onPostcopy(): void;
}

export class SourceStream {
  /** The device state arrived: in precopy at the end, in postcopy inside the switch package. */
  readonly reached: Promise<SwitchPoint>;
  /** A postcopy source's stream ended (EOF): every page it owed has come. */
  readonly ended: Promise<void>;
  /** Pages asked of the source for the destination. */
  requestedFromSource = 0;
  private readonly name: string;
  /** The socket the source streams into now; null while a postcopy source waits to resume. */
  private sock: ByteSocket | null;
  private reader: MigrationStreamReader;
  private readonly events: SourceStreamEvents;
  private readonly endedResolvers: PromiseWithResolvers<void>;
  private readonly pipeline: PagePipeline;
  private blocks: readonly RamBlockInfo[] = [];
  private blockStart: number[] = [];
  /** Per page: the source discarded it and has not sent it again. */
  private owed = new Uint8Array(0);
  private readonly requested = new Set<number>();
  private inPostcopy = false;
  /**
   * The PING the source sends after its switch package was read: QEMU's
   * postcopy_start has passed its last check of the stream, and a stream
   * broken from here on pauses its postcopy instead of failing it.
   */
  pastSwitchCheck = false;
  /** The eviction failed: pages are read to the stream's end and go nowhere. */
  private discarding = false;

  constructor(name: string, sock: ByteSocket, pipeline: PagePipeline, events: SourceStreamEvents) {
    this.name = name;
    this.sock = sock;
    this.pipeline = pipeline;
    this.events = events;
    const reached = Promise.withResolvers<SwitchPoint>();
    const ended = Promise.withResolvers<void>();
    this.endedResolvers = ended;
    this.reached = reached.promise;
    this.ended = ended.promise;
    this.reached.catch(() => {});
    this.ended.catch(() => {});
    const reader = new MigrationStreamReader(settlingFirst({
      onHeader: (bytes) => events.onHeader(bytes),
      onRamBlocks: (blocks) => {
        // first: a source streaming again is checked against what it said before
        events.onBlocks(blocks, reader.ramSection);
        this.learnBlocks(blocks);
      },
      onPage: (block, page, data) => {
        if (this.discarding) return;
        if (this.inPostcopy) {
          const i = this.blockStart[block]! + page;
          this.owed[i] = 0;
          if (this.requested.delete(i)) {
            this.pipeline.urgent(block, page, data);
            return;
          }
        }
        this.pipeline.page(block, page, data);
        events.afterPage();
      },
      onRamSectionEnd: () => this.flush(),
      onCommand: (cmd, payload) => {
        switch (cmd) {
          case Command.PING:
            if (this.inPostcopy) this.pastSwitchCheck = true;
            sock.write(encodePong(new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0)));
            return;
          case Command.POSTCOPY_RAM_DISCARD:
            this.onDiscard(payload);
            return;
          case Command.OPEN_RETURN_PATH:
          case Command.SWITCHOVER_START:
          case Command.POSTCOPY_ADVISE:
            return;
          default:
            throw new SgmError("data", `VM ${this.name}: unexpected ${commandName(cmd)} in the source's stream`);
        }
      },
      onPackaged: (blob) => {
        const pkg = splitPackage(blob);
        trace(`${this.name} source switched to postcopy (${pkg.deviceState.length} bytes of device state)`);
        // the source's PINGs inside the package ask whether the devices loaded: for scatter they have
        for (const value of pkg.pings) sock.write(encodePong(value));
        this.inPostcopy = true;
        events.onPostcopy();
        this.pipeline.flush();
        reached.resolve({ kind: "postcopy", device: pkg.deviceState.slice() });
      },
      onEof: () => {
        this.flush();
        ended.resolve();
      },
      onDeviceState: (bytes) => {
        trace(`${this.name} device state read (${bytes.length} bytes)`);
        this.pipeline.flush();
        reached.resolve({ kind: "precopy", device: bytes.slice() });
      },
    }, () => this.pipeline.settle()));
    this.reader = reader;
    this.attach(sock, reader, (why) => {
      reached.reject(why);
      ended.reject(why);
    });
  }

  private attach(sock: ByteSocket, reader: MigrationStreamReader, onEarlyEnd: (why: Error) => void): void {
    sock.setDataHandler((data) => {
      this.pipeline.beginChunk(data);
      try {
        reader.feed(data);
      } catch (err) {
        // what was read before the failure is applied, as it was page by
        // page; the failure is what is reported
        try {
          this.pipeline.endChunk();
        } catch {}
        throw err;
      }
      this.pipeline.endChunk();
      // the chunk's last pages were placed only now
      this.events.afterPage();
    });
    this.pipeline.setErrorHandler((err) => sock.destroy(err));
    void sock.closed.then((reason) => {
      // a stream dropped on purpose (detach) ends nothing
      if (reader.isComplete || this.sock !== sock) return;
      onEarlyEnd(reason ?? new SgmError("unavailable", `VM ${this.name}: the source QEMU closed its stream early`));
    });
  }

  private flush(): void {
    if (!this.discarding) this.pipeline.flush();
  }

  /** The eviction failed: what the source still sends is read to its end (ended) and dropped. */
  discardPages(): void {
    this.discarding = true;
  }

  /** Whether the source has sent its last page (EOF read). */
  get complete(): boolean {
    return this.reader.isComplete;
  }

  /** Drops the socket: a postcopy source pauses its migration (postcopy-paused), to resume with resumeOn. */
  detach(): void {
    const sock = this.sock;
    this.sock = null;
    sock?.destroy();
  }

  /**
   * The paused postcopy source streams again into `sock` (QEMU's migrate
   * resume). Each block's received bitmap marks what it must send again:
   * pages it still owes, and those whose content a lost relay took. Page
   * requests still unanswered are asked again once it resumed.
   */
  resumeOn(sock: ByteSocket): Promise<void> {
    const resumed = Promise.withResolvers<void>();
    const reader = MigrationStreamReader.resumed(settlingFirst(this.resumedHandler(sock, resumed.resolve), () => this.pipeline.settle()), this.reader);
    this.reader = reader;
    this.sock = sock;
    this.attach(sock, reader, (why) => {
      resumed.reject(why);
      this.endedResolvers.reject(why);
    });
    return resumed.promise;
  }

  /** What a resumed source sends: the recovery handshake, then pages it owed or whose content was lost. */
  private resumedHandler(sock: ByteSocket, resumed: () => void): ConstructorParameters<typeof MigrationStreamReader>[0] {
    const unexpected = (what: string) => {
      throw new SgmError("data", `VM ${this.name}: ${what} in the resumed source's stream`);
    };
    return {
      onHeader: () => unexpected("a header"),
      onRamBlocks: () => unexpected("a RAM block list"),
      onPage: (block, page, data) => {
        if (this.discarding) return;
        const i = this.blockStart[block]! + page;
        if (this.owed[i] !== 1) this.pipeline.refill(block, page, data);
        else {
          this.owed[i] = 0;
          if (this.requested.delete(i)) this.pipeline.urgent(block, page, data);
          else this.pipeline.page(block, page, data);
        }
        // content placed again takes room in the queues as any other
        this.events.afterPage();
      },
      onRamSectionEnd: () => this.flush(),
      onCommand: (cmd, payload) => {
        switch (cmd) {
          case Command.PING:
            sock.write(encodePong(new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0)));
            return;
          case Command.RECV_BITMAP: {
            const name = readRecvBitmapPayload(payload);
            const block = this.blocks.findIndex((b) => b.name === name);
            if (block < 0) throw new SgmError("data", `VM ${this.name}: RECV_BITMAP for unknown RAM block '${name}'`);
            const start = this.blockStart[block]!;
            // received: neither still owed by the source, nor lost with a relay
            const received = (p: number) => this.owed[start + p] !== 1 && !this.pipeline.isLost(start + p);
            sock.write(encodeReceivedBitmap(name, this.blocks[block]!.usedLength / TPS, received));
            return;
          }
          case Command.POSTCOPY_RESUME:
            trace(`${this.name} the source resumes its postcopy`);
            sock.write(encodeResumeAck());
            // requests the dropped socket took with it
            for (const i of this.requested) {
              const block = this.blockOf(i);
              sock.write(encodePageRequest(this.blocks[block]!.name, (i - this.blockStart[block]!) * TPS, TPS));
            }
            resumed();
            return;
          default:
            unexpected(commandName(cmd));
        }
      },
      onPackaged: () => unexpected("PACKAGED"),
      onEof: () => {
        this.flush();
        this.endedResolvers.resolve();
      },
      onDeviceState: () => unexpected("device state"),
    };
  }

  /** The destination waits for a page: if the source still owes it, ask the source for it now. */
  ask(block: number, page: number): void {
    const i = (this.blockStart[block] ?? -1) + page;
    if (!this.inPostcopy || this.owed[i] !== 1 || this.requested.has(i)) return;
    this.requested.add(i);
    this.requestedFromSource++;
    // while the source waits to resume, the request goes with the others once it does
    this.sock?.write(encodePageRequest(this.blocks[block]!.name, page * TPS, TPS));
  }

  private blockOf(i: number): number {
    let b = this.blockStart.length - 1;
    while (b > 0 && this.blockStart[b]! > i) b--;
    return b;
  }

  private learnBlocks(blocks: readonly RamBlockInfo[]): void {
    this.blocks = blocks;
    this.pipeline.setBlocks(blocks);
    let total = 0;
    this.blockStart = blocks.map((b) => {
      const start = total;
      total += b.usedLength / TPS;
      return start;
    });
    this.owed = new Uint8Array(total);
  }

  /** A postcopy source will send these pages again: they are pending at the gather, owed by the source. */
  private onDiscard(payload: Uint8Array): void {
    const discard = readDiscard(payload);
    const block = this.blocks.findIndex((b) => b.name === discard.block);
    if (block < 0) throw new SgmError("data", `VM ${this.name}: discard for unknown RAM block '${discard.block}'`);
    const pages = this.blocks[block]!.usedLength / TPS;
    for (const [first, count] of discard.ranges) {
      if (first + count > pages) throw new SgmError("data", `VM ${this.name}: discard beyond RAM block '${discard.block}'`);
      for (let p = first; p < first + count; p++) {
        this.pipeline.pending(block, p);
        this.owed[this.blockStart[block]! + p] = 1;
      }
    }
  }
}
