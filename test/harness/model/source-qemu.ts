// A model of a source QEMU for in-process eviction tests: it speaks QMP like
// QEMU and, on `migrate`, sends a real migration stream of a scripted guest.
// The script says which pages the guest writes before each pass, so a test
// replays exactly the page sequence it wants (content that repeats, moves,
// vanishes and comes back) through the real scatter, relays and gather.
//
// Passes follow QEMU: each begins with a bitmap sync (MIGRATION_PASS) and
// sends the pages dirtied since the previous one; after `passes` the source
// stops the VM and sends the rest with its device state (precopy), or, once
// asked (migrate-start-postcopy), stops, discards what it will send again,
// sends the device state packaged and then each remaining page once,
// requested pages first (postcopy). A postcopy whose stream breaks pauses
// (postcopy-paused) until `migrate` with resume, then recovers as QEMU
// does: each block's received bitmap asked, what was not received sent.

import { join } from "node:path";
import { ByteSocket } from "../../../core/net/byte-socket.ts";
import { QEVM_MAGIC, QEVM_VERSION, RamFlag, Section, TPS } from "../../../core/qemu/constants.ts";
import { PostcopyStreamWriter } from "../../../core/qemu/postcopy-writer.ts";
import { RecoveryReader } from "../../../core/qemu/postcopy-recovery.ts";
import { ReturnPathReader } from "../../../core/qemu/return-path.ts";
import { type BlockLayout, contentBytes, GuestMemory } from "./guest-memory.ts";
import { QmpError, QmpServer } from "./qmp-server.ts";
import { within } from "../within.ts";

export const MODEL_MACHINE = "pc-i440fx-7.2";
const RAM_SECTION_ID = 2;
const DEVICE_SECTION_ID = 3;

export interface SourceScript {
  blocks: BlockLayout[];
  /** Content id of each page (global index) before the migration starts. */
  initial(index: number): number;
  /**
   * Pages the guest writes, as [global index, content id], before pass
   * `pass` (2, 3, ...). The writes before the source stops come as the pass
   * after the last precopy pass.
   */
  writes(pass: number): Array<[number, number]>;
  /** Precopy passes before the source converges (at least 1). */
  passes: number;
  /**
   * The pass at whose start the source waits for migrate-start-postcopy
   * (scatter asks for it after N passes); without it, a request is taken at
   * the next pass it finds waiting.
   */
  postcopyAtPass?: number;
  /**
   * In postcopy, pages (global index) the source sends only once they are
   * asked for: the guest at the destination touches them before they can
   * have come, so its requests are certain, whatever the timing.
   */
  heldUntilRequested?: number[];
  /**
   * Pages per RAM section at most (default: what fits in 256 KiB). QEMU
   * ends a section every 50 ms or so, which on a fast host can be tens of
   * thousands of pages.
   */
  sectionPages?: number;
  /**
   * The source fails at the start of this pass (2, 3, ...), as QEMU does on
   * an error of its own: the stream closes, the migration is failed and
   * the VM runs on here.
   */
  failAtPass?: number;
}

type Status = "none" | "setup" | "active" | "postcopy-active" | "postcopy-paused" | "postcopy-recover" | "device" | "completed" | "failed" | "cancelled";

export class ModelSourceQemu {
  readonly name: string;
  readonly qmpPath: string;
  readonly memory: GuestMemory;
  /** Pass numbers the source went through, and whether it switched to postcopy. */
  passes = 0;
  switchedToPostcopy = false;
  /** Page requests the source got on its return path. */
  requests = 0;
  /** Resolves once every page has been sent at least once (by the first pass, or in postcopy), but those held until requested. */
  readonly firstPassSent: Promise<void>;
  private readonly firstPass = Promise.withResolvers<void>();
  private readonly script: SourceScript;
  private readonly qmp: QmpServer;
  private status: Status = "none";
  runState: "running" | "paused" | "postmigrate" = "running";
  private capabilities = new Set<string>(["events"]);
  private postcopyAsked = Promise.withResolvers<void>();
  private postcopyWanted = false;
  private dirty: Uint8Array;
  private sock: ByteSocket | null = null;
  private shut = Promise.withResolvers<number>();
  /** Counts migrations: one dropped for another (scatter streams again) stops where it is. */
  private generation = 0;
  private readonly requested: number[] = [];
  /** Resolved, and replaced, as a page request comes or the postcopy pauses. */
  private requestOrPause = Promise.withResolvers<void>();
  private cancelled = false;
  /** While postcopy is paused: resolved with the socket path `migrate` resume names. */
  private resumeTo: PromiseWithResolvers<string> | null = null;
  /** The postcopy has sent its last page: a broken stream now fails it (and runs the VM here). */
  private isCompleting = false;
  private readonly completingNow = Promise.withResolvers<void>();
  /** Resolves as the postcopy has sent its last page. */
  readonly completing = this.completingNow.promise;
  /** Times the postcopy resumed after its stream broke. */
  resumes = 0;

  /** In postcopy, "completed" waits for this too once the scatter sent SHUT: a source slow to report it. */
  private readonly completionHeld: Promise<unknown> | undefined;

  constructor(dir: string, name: string, script: SourceScript, completionHeld?: Promise<unknown>) {
    this.name = name;
    this.completionHeld = completionHeld;
    this.script = script;
    this.memory = new GuestMemory(script.blocks);
    for (let i = 0; i < this.memory.total; i++) this.memory.content[i] = script.initial(i);
    this.dirty = new Uint8Array(this.memory.total);
    this.firstPassSent = this.firstPass.promise;
    this.qmpPath = join(dir, `${name}.qmp`);
    this.qmp = new QmpServer(this.qmpPath, { major: 10, minor: 0, micro: 2 }, {
      "query-status": () => ({ status: this.runState, running: this.runState === "running" }),
      "query-migrate": () => (this.status === "none" ? {} : { status: this.status, ram: { remaining: this.remainingBytes() } }),
      "query-migrate-capabilities": () => [...this.capabilities].map((capability) => ({ capability, state: true })),
      "query-migrate-parameters": () => ({}),
      "migrate-set-capabilities": (args) => {
        for (const c of args.capabilities as Array<{ capability: string; state: boolean }>) {
          if (c.state) this.capabilities.add(c.capability);
          else this.capabilities.delete(c.capability);
        }
      },
      "migrate-set-parameters": () => {},
      "qom-get": () => `${MODEL_MACHINE}-machine`,
      "query-memory-size-summary": () => ({ "base-memory": this.memory.total * 4096 }),
      // as QEMU without a balloon device answers
      "query-balloon": () => {
        throw new QmpError("No balloon device has been activated");
      },
      migrate: (args) => {
        const uri = String(args.uri);
        if (!uri.startsWith("unix:")) throw new QmpError(`model source migrates to unix: only, not ${uri}`);
        if (args.resume === true) {
          if (this.status !== "postcopy-paused" || !this.resumeTo) throw new QmpError(`Cannot resume if there is no paused migration (status ${this.status})`);
          this.resumeTo.resolve(uri.slice(5));
          return;
        }
        if (this.runState === "postmigrate") throw new QmpError("Can't migrate the vm that was paused due to previous migration");
        this.setStatus("setup");
        this.cancelled = false;
        const generation = ++this.generation;
        void this.migrate(uri.slice(5), generation).catch((err: Error) => generation === this.generation && this.fail(err));
      },
      "migrate-start-postcopy": () => {
        if (!this.capabilities.has("postcopy-ram")) throw new QmpError("Enable postcopy with migrate_set_capability before the start of migration");
        this.postcopyWanted = true;
        this.postcopyAsked.resolve();
      },
      migrate_cancel: () => {
        this.cancelled = true;
        this.sock?.destroy();
        if (this.status !== "completed") this.setStatus("cancelled");
        if (this.runState !== "running" && !this.switchedToPostcopy) this.resume();
      },
      cont: () => this.resume(),
      quit: () => {
        this.runState = "postmigrate";
      },
    });
  }

  close(): void {
    this.sock?.destroy();
    this.qmp.close();
  }

  get migrationStatus(): Status {
    return this.status;
  }

  /** RAM still to send, as query-migrate's ram.remaining counts it. */
  private remainingBytes(): number {
    let pages = 0;
    for (let i = 0; i < this.dirty.length; i++) pages += this.dirty[i]!;
    return pages * TPS;
  }

  private setStatus(status: Status): void {
    this.status = status;
    this.qmp.event("MIGRATION", { status });
  }

  private resume(): void {
    if (this.runState === "running") return;
    this.runState = "running";
    this.qmp.event("RESUME");
  }

  private stop(): void {
    this.runState = "paused";
    this.qmp.event("STOP");
  }

  private fail(err: Error): void {
    if (this.cancelled || this.status === "completed") return;
    this.setStatus("failed");
    this.sock?.destroy();
    // as QEMU 10.0's migration_iteration_finish does, even after a postcopy switch: the VM runs here again
    this.resume();
    void err;
  }

  /** The return path of `sock`: SHUT and page requests. */
  private returnPath(sock: ByteSocket, generation: number): ReturnPathReader {
    const shut = Promise.withResolvers<number>();
    shut.promise.catch(() => {});
    this.shut = shut;
    const rp = new ReturnPathReader({
      onShut: (status) => shut.resolve(status),
      onPong: () => {},
      onPageRequest: (block, start) => {
        this.requests++;
        this.requested.push(this.memory.blockStart[this.blockIndex(block)]! + start / TPS);
        this.requestOrPause.resolve();
      },
    });
    void sock.closed.then((reason) => {
      shut.reject(reason ?? new Error("scatter closed the stream"));
      if (this.status === "completed" || generation !== this.generation || this.sock !== sock) return;
      // postcopy waits to be resumed; before it, the migration fails and the VM runs on
      if (this.switchedToPostcopy && !this.isCompleting) this.pausePostcopy();
      else this.fail(reason ?? new Error("closed"));
    });
    return rp;
  }

  private pausePostcopy(): void {
    this.resumeTo = Promise.withResolvers<string>();
    this.setStatus("postcopy-paused");
    this.requestOrPause.resolve();
  }

  /** A paused postcopy resumes: a new channel, each block's received bitmap, what was not received dirty again. */
  private async recover(generation: number): Promise<PostcopyStreamWriter> {
    const path = await this.resumeTo!.promise;
    this.resumeTo = null;
    this.setStatus("postcopy-recover");
    const sock = await ByteSocket.connectUnix(path, `model ${this.name} resumed stream`);
    this.sock = sock;
    const rp = this.returnPath(sock, generation);
    const recovery = new RecoveryReader(this.script.blocks.map((b) => ({ name: b.name, pages: b.pages })));
    sock.setDataHandler((data) => recovery.feed(data));
    const writer = this.writerTo(sock);
    writer.resumeChannel();
    this.script.blocks.forEach((_, b) => writer.askReceived(b));
    writer.flush();
    const bitmaps = await recovery.bitmapsIn;
    this.script.blocks.forEach((block, b) => {
      const received = bitmaps.get(block.name)!;
      for (let p = 0; p < block.pages; p++) if (!received.has(p)) this.dirty[this.memory.blockStart[b]! + p] = 1;
    });
    writer.resumePostcopy();
    await recovery.acked;
    recovery.handOver((data) => rp.feed(data));
    this.resumes++;
    this.setStatus("postcopy-active");
    return writer;
  }

  private writerTo(sock: ByteSocket): PostcopyStreamWriter {
    return new PostcopyStreamWriter({
      header: header(),
      blocks: this.script.blocks.map((b) => ({ name: b.name, usedLength: b.pages * TPS })),
      ramSectionId: RAM_SECTION_ID,
      sink: sock,
      // a flush ends the section
      bufferBytes: this.script.sectionPages === undefined ? undefined : this.script.sectionPages * (TPS + 8),
    });
  }

  private async migrate(path: string, generation: number): Promise<void> {
    const sock = await ByteSocket.connectUnix(path, `model ${this.name} stream`);
    this.sock = sock;
    const rp = this.returnPath(sock, generation);
    sock.setDataHandler((data) => rp.feed(data));

    const writer = this.writerTo(sock);
    writer.begin();
    this.setStatus("active");
    this.dirty.fill(1);
    for (let pass = 1; ; pass++) {
      if (generation !== this.generation || !sock.isOpen) throw new Error("migration dropped");
      if (this.script.failAtPass === pass) throw new Error(`model ${this.name} fails at pass ${pass}`);
      if (pass > 1) this.guestWrites(pass);
      this.sync(pass);
      if (this.script.postcopyAtPass === pass) await this.waitForPostcopyRequest();
      else await Bun.sleep(0); // a request may be on its way
      if (this.postcopyWanted && this.capabilities.has("postcopy-ram")) {
        await this.postcopy(writer, pass + 1, generation);
        return;
      }
      await this.sendDirty(writer, generation);
      this.firstPass.resolve();
      if (pass >= this.script.passes) break;
    }
    // converged: the VM stops, the last dirty pages and the device state follow
    if (generation !== this.generation) throw new Error("migration dropped");
    this.guestWrites(this.passes + 1);
    this.stop();
    this.sync(this.passes + 1);
    await this.sendDirty(writer, generation);
    writer.flush();
    sock.write(precopyEnd());
    this.setStatus("device");
    await this.finish();
  }

  private async postcopy(first: PostcopyStreamWriter, pass: number, generation: number): Promise<void> {
    let writer = first;
    this.guestWrites(pass);
    this.stop();
    this.sync(pass);
    this.switchedToPostcopy = true;
    this.script.blocks.forEach((block, b) => {
      const ranges: Array<[number, number]> = [];
      for (let p = 0; p < block.pages; p++) {
        if (!this.dirty[this.memory.blockStart[b]! + p]) continue;
        const last = ranges[ranges.length - 1];
        if (last && last[0] + last[1] === p) last[1]++;
        else ranges.push([p, 1]);
      }
      if (ranges.length > 0) writer.discard(b, ranges);
    });
    writer.packageAndRun(deviceSection());
    // as postcopy_start does: once this is out, a broken stream pauses the postcopy
    writer.ping(4);
    writer.flush();
    this.setStatus("postcopy-active");
    // each remaining page once, requested ones first
    const held = new Set(this.script.heldUntilRequested ?? []);
    let next = 0;
    for (;;) {
      if (generation !== this.generation) throw new Error("migration dropped");
      if (this.status === "postcopy-paused") {
        writer = await this.recover(generation);
        next = 0;
      }
      let i = -1;
      while (this.requested.length > 0 && i < 0) {
        const r = this.requested.shift()!;
        if (this.dirty[r]) i = r;
      }
      if (i < 0) {
        while (next < this.memory.total && (!this.dirty[next] || held.has(next))) next++;
        if (next < this.memory.total) i = next;
        else {
          const waiting = [...held].filter((h) => this.dirty[h]);
          if (waiting.length === 0) break;
          writer.flush();
          this.firstPass.resolve();
          await within(this.requestOrPause.promise, 30_000, `model ${this.name}: no request for pages ${waiting.join(", ")}, held until requested,`);
          this.requestOrPause = Promise.withResolvers<void>();
          continue;
        }
      }
      this.sendPage(writer, i);
      if (this.sock!.queuedBytes > 256 * 1024) {
        writer.flush();
        // a stream that breaks meanwhile pauses the postcopy (above)
        await this.sock!.whenWritable(64 * 1024).catch(() => {});
      }
      if (i % 64 === 0) {
        writer.flush();
        await Bun.sleep(0); // let page requests in
      }
    }
    this.firstPass.resolve();
    // QEMU's migration_completion: a stream that breaks from here on fails the migration
    this.isCompleting = true;
    writer.end();
    this.completingNow.resolve();
    await this.finish(this.completionHeld);
  }

  private async finish(held?: Promise<unknown>): Promise<void> {
    const status = await this.shut.promise;
    if (status !== 0) throw new Error(`scatter sent SHUT ${status}`);
    await held;
    this.runState = "postmigrate";
    this.setStatus("completed");
  }

  private waitForPostcopyRequest(): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<void>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`model ${this.name}: no migrate-start-postcopy at pass ${this.passes}`)), 10_000);
    });
    return Promise.race([this.postcopyAsked.promise, timeout]).finally(() => clearTimeout(timer));
  }

  private guestWrites(pass: number): void {
    for (const [i, id] of this.script.writes(pass)) {
      this.memory.content[i] = id;
      this.dirty[i] = 1;
    }
  }

  private sync(pass: number): void {
    this.passes = pass;
    this.qmp.event("MIGRATION_PASS", { pass });
  }

  private async sendDirty(writer: PostcopyStreamWriter, generation: number): Promise<void> {
    for (let i = 0; i < this.memory.total; i++) {
      if (generation !== this.generation) throw new Error("migration dropped");
      if (!this.dirty[i]) continue;
      this.sendPage(writer, i);
      if (this.sock!.queuedBytes > 1024 * 1024) {
        writer.flush();
        await this.sock!.whenWritable(256 * 1024);
      }
    }
    writer.flush();
  }

  private sendPage(writer: PostcopyStreamWriter, i: number): void {
    const { block, page } = this.memory.blockOf(i);
    writer.page(block, page, contentBytes(this.memory.content[i]!));
    this.dirty[i] = 0;
  }

  private blockIndex(name: string): number {
    const b = this.script.blocks.findIndex((x) => x.name === name);
    if (b < 0) throw new Error(`page request for unknown block ${name}`);
    return b;
  }
}

function header(): Uint8Array {
  const machine = new TextEncoder().encode(MODEL_MACHINE);
  const out = new Uint8Array(13 + machine.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, QEVM_MAGIC);
  dv.setUint32(4, QEVM_VERSION);
  out[8] = Section.CONFIGURATION;
  dv.setUint32(9, machine.length);
  out.set(machine, 13);
  return out;
}

/** One device's FULL section, as QEMU sends the device state. */
export function deviceSection(): Uint8Array {
  const name = new TextEncoder().encode("timer");
  const out = new Uint8Array(1 + 4 + 1 + name.length + 8 + 16 + 5);
  const dv = new DataView(out.buffer);
  out[0] = Section.FULL;
  dv.setUint32(1, DEVICE_SECTION_ID);
  out[5] = name.length;
  out.set(name, 6);
  let p = 6 + name.length;
  dv.setUint32(p, 0); // instance
  dv.setUint32(p + 4, 2); // version
  p += 8;
  for (let i = 0; i < 16; i++) out[p + i] = 0xa0 + i;
  p += 16;
  out[p] = Section.FOOTER;
  dv.setUint32(p + 1, DEVICE_SECTION_ID);
  return out;
}

/** RAM's END section, the device state, EOF and the VM description. */
function precopyEnd(): Uint8Array {
  const end = new Uint8Array(1 + 4 + 8 + 5);
  const dv = new DataView(end.buffer);
  end[0] = Section.END;
  dv.setUint32(1, RAM_SECTION_ID);
  dv.setUint32(9, RamFlag.EOS);
  end[13] = Section.FOOTER;
  dv.setUint32(14, RAM_SECTION_ID);
  const json = new TextEncoder().encode(JSON.stringify({ page_size: TPS, devices: [{ name: "timer", instance_id: 0 }] }));
  const desc = new Uint8Array(2 + 4 + json.length);
  desc[0] = Section.EOF;
  desc[1] = Section.VMDESCRIPTION;
  new DataView(desc.buffer).setUint32(2, json.length);
  desc.set(json, 6);
  return Buffer.concat([end, deviceSection(), desc]);
}

