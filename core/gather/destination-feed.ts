// Feeds one destination QEMU the stream of a postcopy source. Before
// switchover precopy-feed.ts feeds pages as the gather learns them, as fast
// as QEMU reads; at switchover it discards every page whose fed content is stale
// (or was never fed), sends the device state packaged with LISTEN and RUN,
// and from then on postcopy-delivery.ts delivers every remaining page
// exactly once. Once every page is in, it checks its delivery and ends the
// stream.
//
// A page that owes the destination its current content holds a need on it
// (content-directory.ts, owed-content.ts), so the bytes stay until written
// there; written, the page lets go, and the gather holds no copy of the VM.

import { join } from "node:path";
import { SgmError } from "../errors.ts";
import { ByteSocket } from "../net/byte-socket.ts";
import { TPS } from "../qemu/constants.ts";
import { PING_DEVICE_LOADED, PostcopyStreamWriter } from "../qemu/postcopy-writer.ts";
import { ReturnPathReader } from "../qemu/return-path.ts";
import type { RamBlockInfo } from "../qemu/stream-reader.ts";
import { checkWrites } from "../test-faults.ts";
import { trace } from "../trace.ts";
import type { ContentDirectory } from "./content-directory.ts";
import type { DestinationQemu } from "./destination-qemu.ts";
import { checkDelivery, finalMapDigest } from "./final-checks.ts";
import { PageWaits } from "./page-waits.ts";
import { PostcopyDelivery } from "./postcopy-delivery.ts";
import { PrecopyFeed } from "./precopy-feed.ts";
import type { FeedContext } from "./feed-context.ts";
import { type FeedStats, newFeedStats } from "./feed-stats.ts";
import { claimSavedState, type SavedOrigin, settleReceived, snapshotFeedState } from "./feed-state.ts";
import type { ResumeState } from "./resume-state.ts";
import { StateKeeper } from "./state-keeper.ts";
import { recoverChannel } from "./recovery-handshake.ts";
import { countPages, pickSpare, settleFed, staleRanges } from "./switchover-discards.ts";
import { NOT_FED, PageTable, PENDING } from "./page-table.ts";
import { OwedContent } from "./owed-content.ts";
import { PageWrites } from "./page-writes.ts";

export interface FeedOptions {
  name: string;
  dest: DestinationQemu;
  /** Directory for the unix socket QEMU listens on. */
  socketDir: string;
  header: Uint8Array;
  blocks: readonly RamBlockInfo[];
  sectionId: number;
  dir: ContentDirectory;
  /** Asks for content held only on relays; `urgent` when the destination waits for it. */
  fetch: (cid: number, urgent: boolean) => void;
  /** Asks the scatter for a page a postcopy source has not sent again yet. */
  fromSource: (block: number, page: number) => void;
  /**
   * Bytes per second for the background push after switchover (like QEMU's
   * max-postcopy-bandwidth); requested pages are never held back.
   */
  postcopyBandwidth?: number;
  /** Where to save what a gather restarted with --resume needs, once the VM runs here; null: nowhere. */
  statePath: string | null;
  /** The run's id, relays and start, as the state must name them. */
  origin: () => SavedOrigin;
  log: (line: string) => void;
}

type Phase = "precopy" | "switching" | "postcopy" | "ended" | "failed";

export class DestinationFeed {
  readonly name: string;
  readonly table: PageTable;
  readonly stats: FeedStats = newFeedStats();
  /** Resolves when the destination reports the migration completed. */
  readonly completed: Promise<void>;

  private readonly options: FeedOptions;
  private readonly dest: DestinationQemu;
  private readonly dir: ContentDirectory;
  private readonly postcopyBandwidth: number;
  private readonly socketPath: string;
  private writer!: PostcopyStreamWriter;
  private sock: ByteSocket | null = null;
  private phase: Phase = "precopy";
  /** Before switchover. */
  private precopy: PrecopyFeed | null = null;
  private readonly blockIndex: Map<string, number>;
  private readonly done = Promise.withResolvers<void>();
  private readonly devicesLoaded = Promise.withResolvers<void>();
  private failure: Error | null = null;
  /** After switchover. */
  private delivery: PostcopyDelivery | null = null;
  /** Pages waiting for content from a relay, before switchover and after. */
  private readonly waits: PageWaits;
  /** Pages a postcopy source discarded and has not sent again yet. */
  private pending = 0;
  /** No more page maps will come (set before switchover for a precopy source). */
  private sourceDone = false;
  /** Claimed from a saved state by a gather started with --resume. */
  private claimed = false;
  /** The needs the pages (and the spare page) hold on their content. */
  private readonly owed: OwedContent;
  /** Where page bytes go to the destination. */
  private readonly writes: PageWrites;
  /** The VM's saved state for --resume; the scatter may quit the source once it is written (state.saved). */
  readonly state: StateKeeper;
  /** The final map's digest, once computed for the scatter to compare. */
  private agreedMap = "";

  constructor(options: FeedOptions) {
    this.options = options;
    this.name = options.name;
    this.dest = options.dest;
    this.dir = options.dir;
    this.postcopyBandwidth = options.postcopyBandwidth ?? Infinity;
    this.state = new StateKeeper(options.statePath, options.name, options.log);
    this.table = new PageTable(options.blocks);
    this.owed = new OwedContent(this.table, this.dir);
    this.writes = new PageWrites({
      table: this.table,
      dir: this.dir,
      owed: this.owed,
      stats: this.stats,
      writer: () => this.writer,
      postcopy: () => this.phase === "postcopy",
      checkBytes: checkWrites,
    });
    this.waits = new PageWaits(this.table.total);
    this.dir.onLocal((cid) => this.waits.wake(cid, this.arrivedHere));
    this.blockIndex = new Map(options.blocks.map((b, i) => [b.name, i]));
    this.socketPath = join(options.socketDir, `${options.name}.incoming.sock`);
    this.completed = this.done.promise;
    this.completed.catch(() => {});
  }

  get bytesToQemu(): number {
    return this.writer?.written ?? 0;
  }

  /** Has QEMU listen, connects, and starts the stream. */
  async start(): Promise<void> {
    // a state left by an earlier migration to this QEMU must never be resumed into this one
    this.state.forget();
    await this.dest.listen(this.socketPath);
    const sock = await this.connect();
    const rp = this.returnPath();
    sock.setDataHandler((data) => rp.feed(data));
    this.precopy = new PrecopyFeed({
      ...this.pumpContext("precopy"),
      withholds: (i) => this.writes.withholds(i),
      write: (i, c) => this.writes.write(i, c),
    });
    this.writer.begin();
    this.writer.flush();
  }

  /**
   * A gather restarted with --resume, the VM running here on a paused
   * postcopy: first the saved state, every page not confirmed at the
   * destination owing its content (feed-state.ts claimSavedState).
   */
  claim(state: ResumeState): void {
    this.claimed = true;
    this.phase = "switching";
    this.sourceDone = true;
    this.agreedMap = state.map;
    claimSavedState(state, this.table, this.dir);
  }

  /**
   * Then a fresh channel through QEMU's postcopy recovery, what the
   * destination says it received, and delivery of the rest as after a
   * switchover.
   */
  async resume(): Promise<void> {
    const t = this.table;
    await this.dest.recover(this.socketPath);
    const sock = await this.connect();
    const recovery = await recoverChannel(this.name, t, this.writer, sock, (received) => settleReceived(this.name, t, this.dir, received));
    const rp = this.returnPath();
    this.phase = "postcopy";
    this.startDelivery();
    recovery.handOver((data) => rp.feed(data));
    void this.finishIfDone();
  }

  private async connect(): Promise<ByteSocket> {
    const sock = await ByteSocket.connectUnix(this.socketPath, `VM ${this.name}: destination stream`);
    this.sock = sock;
    const o = this.options;
    this.writer = new PostcopyStreamWriter({ header: o.header, blocks: o.blocks, ramSectionId: o.sectionId, sink: sock });
    void sock.closed.then((reason) => {
      if (this.phase !== "ended") this.fail(reason ?? new SgmError("unavailable", `VM ${this.name}: destination QEMU closed the migration stream`));
    });
    void this.dest.qmp.closed.then(() => this.fail(new SgmError("unavailable", `VM ${this.name}: destination QEMU went away`)));
    return sock;
  }

  private returnPath(): ReturnPathReader {
    return new ReturnPathReader({
      onShut: (status) => {
        if (status !== 0) this.fail(new SgmError("unavailable", `VM ${this.name}: destination QEMU ended the migration with an error (SHUT ${status})`));
      },
      onPong: (value) => {
        if (this.writes.acks.pong(value)) return;
        trace(`${this.name} PONG ${value} from the destination`);
        if (value === PING_DEVICE_LOADED) this.devicesLoaded.resolve();
      },
      onPageRequest: (block, start, length) => this.onRequest(block, start, length),
    });
  }

  /** The page's content is now `cid` (or ZERO, PENDING). */
  map(block: number, page: number, cid: number): void {
    const t = this.table;
    const i = t.index(block, page);
    const old = t.content[i]!;
    this.owed.setContent(i, cid);
    if (old === PENDING) this.pending--;
    if (cid === PENDING) this.pending++;
    if (this.phase === "precopy") {
      if (t.fed[i] !== cid) this.precopy!.enqueue(i);
      return;
    }
    // after switchover only a postcopy source's pages come, each once
    if (this.phase !== "postcopy" || cid === PENDING) return;
    if (t.delivered[i]) throw new SgmError("data", `VM ${this.name}: the source sent page ${page} of block ${block} after it was delivered`);
    this.delivery!.sourcePage(i, cid);
  }

  /** Switches the destination over: discards, device state, RUN. Postcopy delivery starts. */
  async switchover(deviceState: Uint8Array): Promise<void> {
    if (this.phase !== "precopy") throw new SgmError("internal", `VM ${this.name}: switchover in phase ${this.phase}`);
    this.phase = "switching";
    await this.precopy?.stopped;
    if (this.failure) throw this.failure;
    const t = this.table;
    const discards = staleRanges(t);
    let discarded = countPages(discards);
    const spare = this.owed.spare >= 0 ? this.owed.spare : pickSpare(t, this.dir);
    if (discarded === 0) {
      // QEMU needs at least one discard before LISTEN or its listen thread
      // deadlocks; give up a page fed and deliver it again later
      if (spare < 0) throw new SgmError("internal", `VM ${this.name}: no page to discard at switchover`);
      t.fed[spare] = NOT_FED;
      this.owed.setContent(spare, t.content[spare]!);
      const b = t.blockOf(spare);
      discards[b]!.push([spare - t.blockStart[b]!, 1]);
      discarded = 1;
    }
    this.owed.dropSpare();
    discards.forEach((ranges, b) => {
      if (ranges.length > 0) this.writer.discard(b, ranges);
    });
    this.stats.discardedPages = discarded;
    settleFed(t);
    trace(`${this.name} switchover: ${discarded} pages discarded, ${this.sock?.queuedBytes} bytes queued to QEMU`);
    this.writer.packageAndRun(deviceState);
    this.phase = "postcopy";
    // a precopy source's map is final: from here on only this gather and the relays hold what the VM still needs
    if (this.sourceDone) this.saveState();
    // delivery parks again what it still waits for
    this.waits.clear();
    this.startDelivery();
  }

  private startDelivery(): void {
    this.delivery = new PostcopyDelivery({
      ...this.pumpContext("postcopy"),
      bandwidth: this.postcopyBandwidth,
      fromSource: this.options.fromSource,
      deliver: (i) => this.writes.deliver(i),
      progressed: () => void this.finishIfDone(),
    });
    this.delivery.start();
  }

  /** What both pumps are given; each runs while the feed is in its phase. */
  private pumpContext(phase: "precopy" | "postcopy"): FeedContext {
    return {
      table: this.table,
      dir: this.dir,
      writer: this.writer,
      sock: this.sock!,
      stats: this.stats,
      waits: this.waits,
      fetch: this.options.fetch,
      active: () => this.phase === phase,
      fail: (err) => this.fail(err),
    };
  }

  /** Pages that still owe the destination content `lacking` picks (the switchover's spare page too). */
  owedPages(lacking: (cid: number) => boolean): number {
    return this.owed.pages(lacking);
  }

  /** Pages owing content held neither here nor on a live relay (a relay lost with the only copy). */
  unreachablePages(): number {
    return this.owedPages((c) => !this.dir.isLocal(c) && this.dir.relayMask(c) === 0);
  }

  /** RUN has gone to the destination, from this gather or one before it (a claimed VM): it may be running the VM. */
  get runsThere(): boolean {
    return this.claimed || this.phase === "postcopy" || this.phase === "ended";
  }

  /** The digest of the final page map, once every page is named (see final-checks.ts). */
  finalMapDigest(): string {
    this.agreedMap = finalMapDigest(this.name, this.table, this.dir);
    return this.agreedMap;
  }

  /** Wall-clock time (epoch ms) the VM resumed at the destination; null if it stays paused there (-S). */
  resumedAt(): Promise<number | null> {
    return this.dest.resumedAt(this.devicesLoaded.promise);
  }

  /** Stops feeding; the destination QEMU's incoming migration fails. */
  abort(reason: Error): void {
    this.fail(reason);
  }

  /** arrived, made once: every content that comes wakes the pages waiting for it. */
  private readonly arrivedHere = (i: number): void => this.arrived(i);

  /** The content page i waited for came from a relay. */
  private arrived(i: number): void {
    if (this.phase === "precopy") {
      const t = this.table;
      if (t.fed[i] !== t.content[i]) this.precopy!.enqueue(i);
    } else if (this.phase === "postcopy") this.delivery!.arrived(i);
  }

  // ---- after switchover ------------------------------------------------------

  /** The source streams again (see vm-arrival.ts): its end is still to come. */
  sourceRestarted(): void {
    if (this.phase !== "precopy") throw new SgmError("internal", `VM ${this.name}: source restarted in phase ${this.phase}`);
    this.sourceDone = false;
    this.owed.dropSpare();
  }

  /** The postcopy source's stream ended: every page it owed has come. */
  sourceFinished(): void {
    this.sourceDone = true;
    if (this.phase === "precopy") {
      // a page to give again at switchover if need be (see there), chosen
      // while the scatter's pins still keep content here; a need keeps it
      this.owed.keepSpare();
    }
    if (this.pending > 0) {
      this.fail(new SgmError("data", `VM ${this.name}: the source's stream ended with ${this.pending} pages it discarded never sent again`));
      return;
    }
    // a postcopy source's last page is here: saved before the scatter hears so and quits the source
    if (this.phase === "postcopy") this.saveState();
    void this.finishIfDone();
  }

  private async finishIfDone(): Promise<void> {
    if (this.phase !== "postcopy" || !this.delivery!.idle || this.pending > 0 || !this.sourceDone) return;
    if (this.writes.withheld !== null) return; // SGM_TEST_FAULT=gather-withhold: what is withheld is on its way, for ever
    try {
      checkDelivery(this.name, this.table, this.dir);
    } catch (err) {
      this.fail(err as Error);
      return;
    }
    this.writer.end();
    this.phase = "ended";
    trace(`${this.name} every page sent; EOF`);
    try {
      await this.dest.waitCompleted(24 * 3600 * 1000);
      // the destination has every page: what was kept for a resume can go
      this.writes.acks.confirmAll();
      this.state.forget();
      this.done.resolve();
    } catch (err) {
      this.failure = err as Error;
      this.done.reject(err);
    }
  }

  /** The state, taken now, written while delivery goes on (state-keeper.ts). */
  private saveState(): void {
    const o = this.options;
    this.state.save(() => snapshotFeedState({ name: this.name, blocks: o.blocks, sectionId: o.sectionId, map: this.agreedMap, ...o.origin() }, this.table, this.dir));
  }

  private onRequest(blockName: string, start: number, length: number): void {
    this.stats.requests++;
    const b = this.blockIndex.get(blockName);
    if (b === undefined) throw new SgmError("data", `VM ${this.name}: destination requested a page of unknown block '${blockName}'`);
    // before RUN none can be requested; after EOF every page is in
    if (this.phase === "postcopy") this.delivery!.request(b, start / TPS, Math.max(1, Math.ceil(length / TPS)));
  }

  private fail(reason: Error): void {
    // after EOF QEMU closes the stream itself; completion is judged over QMP
    if (this.failure || this.phase === "ended") return;
    // a claimed VM ran here before this gather: a failed recovery keeps what another --resume needs
    const ran = this.runsThere;
    this.failure = reason;
    this.phase = "failed";
    // a wrong page may be at the destination: nothing may resume this VM
    const wrong = reason instanceof SgmError && reason.kind === "data";
    if (wrong) this.state.forget();
    this.sock?.destroy(reason);
    this.owed.letGoAll(ran && !wrong);
    this.done.reject(reason);
  }
}
