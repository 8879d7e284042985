// Reads one source QEMU's migration stream as it arrives and hands every
// page to the page pipeline. It answers the source's PINGs, and keeps what a
// postcopy source still owes: the pages it discarded are pending until it
// sends them again, and one the destination waits for is asked of it on its
// return path (its copy then goes ahead of the rest).

import { SgmError } from "../errors.ts";
import type { ByteSocket } from "../net/byte-socket.ts";
import { Command, commandName, TPS } from "../qemu/constants.ts";
import { readDiscard, splitPackage } from "../qemu/postcopy-commands.ts";
import { encodePageRequest, encodePong } from "../qemu/return-path.ts";
import { MigrationStreamReader, type RamBlockInfo } from "../qemu/stream-reader.ts";
import { trace } from "../trace.ts";
import type { PagePipeline } from "./page-pipeline.ts";

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
  private readonly sock: ByteSocket;
  private readonly pipeline: PagePipeline;
  private blocks: readonly RamBlockInfo[] = [];
  private blockStart: number[] = [];
  /** Per page: the source discarded it and has not sent it again. */
  private owed = new Uint8Array(0);
  private readonly requested = new Set<number>();
  private inPostcopy = false;

  constructor(name: string, sock: ByteSocket, pipeline: PagePipeline, events: SourceStreamEvents) {
    this.name = name;
    this.sock = sock;
    this.pipeline = pipeline;
    const reached = Promise.withResolvers<SwitchPoint>();
    const ended = Promise.withResolvers<void>();
    this.reached = reached.promise;
    this.ended = ended.promise;
    this.reached.catch(() => {});
    this.ended.catch(() => {});
    const reader = new MigrationStreamReader({
      onHeader: (bytes) => events.onHeader(bytes),
      onRamBlocks: (blocks) => {
        // first: a source streaming again is checked against what it said before
        events.onBlocks(blocks, reader.ramSection);
        this.learnBlocks(blocks);
      },
      onPage: (block, page, data) => {
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
      onRamSectionEnd: () => this.pipeline.flush(),
      onCommand: (cmd, payload) => {
        switch (cmd) {
          case Command.PING:
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
        this.pipeline.flush();
        ended.resolve();
      },
      onDeviceState: (bytes) => {
        trace(`${this.name} device state read (${bytes.length} bytes)`);
        this.pipeline.flush();
        reached.resolve({ kind: "precopy", device: bytes.slice() });
      },
    });
    sock.setDataHandler((data) => reader.feed(data));
    pipeline.setErrorHandler((err) => sock.destroy(err));
    void sock.closed.then((reason) => {
      if (reader.isComplete) return;
      const why = reason ?? new SgmError("unavailable", `VM ${this.name}: the source QEMU closed its stream early`);
      reached.reject(why);
      ended.reject(why);
    });
  }

  /** The destination waits for a page: if the source still owes it, ask the source for it now. */
  ask(block: number, page: number): void {
    const i = (this.blockStart[block] ?? -1) + page;
    if (!this.inPostcopy || this.owed[i] !== 1 || this.requested.has(i)) return;
    this.requested.add(i);
    this.requestedFromSource++;
    this.sock.write(encodePageRequest(this.blocks[block]!.name, page * TPS, TPS));
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
