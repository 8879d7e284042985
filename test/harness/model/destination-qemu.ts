// A model of a destination QEMU started with -incoming defer, for in-process
// eviction tests: it speaks QMP like QEMU, reads the postcopy stream the
// gather sends into a memory image, and holds the gather to QEMU's rules
// (discards only before LISTEN, no page placed twice after it, every PING
// answered). After RUN the guest "touches" the pages a test names; those
// not received yet are requested on the return path, as QEMU's fault
// thread does.

import type { Socket, UnixSocketListener } from "bun";
import { join } from "node:path";
import { TPS } from "../../../core/qemu/constants.ts";
import { readDiscard, splitPackage } from "../../../core/qemu/postcopy-commands.ts";
import { encodePageRequest, encodePong, encodeShut } from "../../../core/qemu/return-path.ts";
import { Command } from "../../../core/qemu/constants.ts";
import { MigrationStreamReader } from "../../../core/qemu/stream-reader.ts";
import { type BlockLayout, contentIdOf, GuestMemory } from "./guest-memory.ts";
import { MODEL_MACHINE } from "./source-qemu.ts";
import { QmpError, QmpServer } from "./qmp-server.ts";

export interface DestinationOptions {
  blocks: BlockLayout[];
  /** Global page indexes the guest touches right after it resumes. */
  touches?: number[];
  /** Started with -S: it stays paused after the switchover. */
  paused?: boolean;
  /** migrate-incoming answers only once this resolves: a destination slow to start listening. */
  listenAfter?: Promise<void>;
  /** Called as the VM runs here: the stream is not read again until the promise it returns resolves (a destination slower than its relays). */
  holdReading?: () => Promise<void>;
}

type Status = "none" | "active" | "postcopy-active" | "completed" | "failed";

export class ModelDestinationQemu {
  readonly name: string;
  readonly qmpPath: string;
  readonly memory: GuestMemory;
  /** Every page's bytes as they are now. */
  readonly image: Uint8Array;
  /** Pages requested from the gather, and the ones that were not in yet when touched. */
  requests = 0;
  /** What went wrong, as QEMU would have failed the migration. */
  error: string | null = null;
  private readonly options: DestinationOptions;
  private readonly qmp: QmpServer;
  private status: Status = "none";
  /** "none" until the gather has asked it to take an incoming migration. */
  get migrationStatus(): Status {
    return this.status;
  }
  runState: "inmigrate" | "running" | "paused" = "inmigrate";
  private readonly received: Uint8Array;
  private listening = false;
  private listener: UnixSocketListener<undefined> | null = null;
  private conn: Socket<undefined> | null = null;

  constructor(dir: string, name: string, options: DestinationOptions) {
    this.name = name;
    this.options = options;
    this.memory = new GuestMemory(options.blocks);
    this.image = new Uint8Array(this.memory.total * TPS);
    this.received = new Uint8Array(this.memory.total);
    this.qmpPath = join(dir, `${name}.qmp`);
    this.qmp = new QmpServer(this.qmpPath, { major: 10, minor: 0, micro: 2 }, {
      "query-status": () => ({ status: this.runState, running: this.runState === "running" }),
      "query-migrate": () => (this.status === "none" ? {} : { status: this.status, ...(this.error ? { "error-desc": this.error } : {}) }),
      "migrate-set-capabilities": () => {},
      "qom-get": () => `${MODEL_MACHINE}-machine`,
      "migrate-incoming": async (args) => {
        const uri = String(args.uri);
        if (!uri.startsWith("unix:")) throw new QmpError(`model destination listens on unix: only, not ${uri}`);
        await options.listenAfter;
        // as QEMU's qmp_migrate_incoming: once per process
        if (this.status !== "none" || this.listener) throw new QmpError("The incoming migration has already been started");
        this.listen(uri.slice(5));
      },
      cont: () => {
        if (this.runState === "paused") this.resume();
      },
      stop: () => {
        if (this.runState === "running") this.qmp.event("STOP");
        this.runState = "paused";
      },
    });
  }

  /** Content id each page holds now (-1 for bytes no content id makes). */
  contentIds(): Int32Array {
    const ids = new Int32Array(this.memory.total);
    for (let i = 0; i < this.memory.total; i++) ids[i] = contentIdOf(this.image.subarray(i * TPS, (i + 1) * TPS));
    return ids;
  }

  close(): void {
    this.conn?.end();
    this.listener?.stop(true);
    this.qmp.close();
  }

  private setStatus(status: Status): void {
    this.status = status;
    this.qmp.event("MIGRATION", { status });
  }

  private resume(): void {
    this.runState = "running";
    this.qmp.event("RESUME");
  }

  private fail(why: string): void {
    if (this.error) return;
    this.error = why;
    this.setStatus("failed");
    this.conn?.end();
  }

  private listen(path: string): void {
    const reader = new MigrationStreamReader({
      onHeader: () => {},
      onRamBlocks: (blocks) => {
        const mine = this.options.blocks.map((b) => `${b.name}:${b.pages * TPS}`).join(",");
        const theirs = blocks.map((b) => `${b.name}:${b.usedLength}`).join(",");
        if (mine !== theirs) this.fail(`RAM blocks ${theirs}, not ${mine}`);
      },
      onPage: (block, page, data) => this.page(this.memory.blockStart[block]! + page, data),
      onRamSectionEnd: () => {},
      onCommand: (cmd, payload) => {
        if (cmd === Command.POSTCOPY_RAM_DISCARD) this.discard(payload);
        else if (cmd === Command.PING) this.send(encodePong(new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0)));
      },
      onPackaged: (blob) => {
        if (this.listening) return this.fail("a second PACKAGED");
        const pkg = splitPackage(blob);
        this.listening = true;
        this.setStatus("postcopy-active");
        for (const value of pkg.pings) this.send(encodePong(value));
        if (this.options.paused) this.runState = "paused";
        else this.resume();
        this.touch();
        const hold = this.options.holdReading;
        if (hold && this.conn) {
          this.conn.pause();
          void hold().then(() => this.conn?.resume());
        }
      },
      onDeviceState: () => this.fail("a precopy end from the gather"),
      onEof: () => {
        const missing = this.options.touches?.filter((i) => !this.received[i]) ?? [];
        if (missing.length > 0) return this.fail(`ended with touched pages never placed: ${missing.slice(0, 5).join(", ")}`);
        this.send(encodeShut(0));
        this.setStatus("completed");
      },
    });
    const listen = (socket: Parameters<typeof Bun.listen<undefined>>[0]["socket"]) => {
      try {
        return Bun.listen<undefined>({ unix: path, socket });
      } catch (err) {
        // as QEMU answers migrate-incoming when it cannot bind (the gather's directory gone, say)
        throw new QmpError(`Failed to bind socket: ${(err as Error).message}`);
      }
    };
    this.listener = listen({
      open: (socket) => {
        if (this.conn) return void socket.end();
        this.conn = socket;
      },
      data: (_socket, chunk) => {
        try {
          reader.feed(chunk);
        } catch (err) {
          this.fail((err as Error).message);
        }
      },
      close: () => {
        if (this.status !== "completed") this.fail("the gather closed the stream");
      },
    });
    this.setStatus("active");
  }

  private page(i: number, data: Uint8Array | null): void {
    if (this.listening) {
      // QEMU places each page once after LISTEN (UFFDIO_COPY fails with EEXIST)
      if (this.received[i]) return this.fail(`page ${i} placed twice after LISTEN`);
    }
    const at = i * TPS;
    if (data) this.image.set(data, at);
    else this.image.fill(0, at, at + TPS);
    this.received[i] = 1;
  }

  private discard(payload: Uint8Array): void {
    if (this.listening) return this.fail("POSTCOPY_RAM_DISCARD after LISTEN");
    const discard = readDiscard(payload);
    const b = this.options.blocks.findIndex((x) => x.name === discard.block);
    if (b < 0) return this.fail(`discard of unknown block ${discard.block}`);
    for (const [first, count] of discard.ranges) {
      for (let p = first; p < first + count; p++) {
        const i = this.memory.blockStart[b]! + p;
        this.image.fill(0, i * TPS, (i + 1) * TPS);
        this.received[i] = 0;
      }
    }
  }

  /** The guest runs and touches pages: those not here yet are asked for. */
  private touch(): void {
    for (const i of this.options.touches ?? []) {
      if (this.received[i]) continue;
      const { block, page } = this.memory.blockOf(i);
      this.requests++;
      this.send(encodePageRequest(this.options.blocks[block]!.name, page * TPS, TPS));
    }
  }

  private send(bytes: Uint8Array): void {
    this.conn?.write(bytes);
  }
}
