// The gather role: receives every VM bound for this host from the scatter,
// takes pages sent to it directly and fetches the rest from relays, checks
// every page against its digest, and feeds each destination QEMU. It exits
// when every VM it serves completed or failed.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DigestPool } from "../dedup/digest-pool.ts";
import { asSgmError, SgmError } from "../errors.ts";
import type { ProgressSource } from "../progress.ts";
import { collectGarbageEvery } from "../net/garbage.ts";
import { RateLimiter } from "../net/rate-limiter.ts";
import { encodeProbeAck, ProbeFrame } from "../wire/probe-frames.ts";
import { parseQmpAddress } from "../qmp/client.ts";
import type { PeerConnection, TlsFiles } from "../wire/connection.ts";
import { listenPeers, type PeerListener } from "../wire/peer-listener.ts";
import {
  type Control,
  decodeControl,
  decodeVmBytes,
  encodeControl,
  ENTRY_PENDING,
  FrameType,
  maxPayload,
  readLocations,
  readDigests,
  readPageMap,
  VmBytesKind,
} from "../wire/messages.ts";
import { ContentDirectory } from "./content-directory.ts";
import { holderSocketPath, prepareStateDir, resumeStatePath } from "./resume-state.ts";
import { openForResume, resumeAll, unresumableReport } from "./resume.ts";
import { DestinationQemu } from "./destination-qemu.ts";
import type { HolderPlan } from "../qmp/holder-launch.ts";
import { PENDING, ZERO } from "./page-table.ts";
import { type FetcherStats, RelayFetcher } from "./relay-fetcher.ts";
import type { SavedRun } from "./feed-state.ts";
import { type ArrivalReport, VmArrival } from "./vm-arrival.ts";
import { CheckedFrames } from "./checked-frames.ts";

export interface GatherOptions {
  listen: { host: string; port: number };
  vms: Array<{ name: string; qmp: string }>;
  psk: Uint8Array;
  /** TLS under the key, for the scatter's connection and the relays'; none by default. */
  tls?: TlsFiles | null;
  /** Bytes per second the gather receives at most, from the scatter and relays together. */
  maxRate?: number;
  /** Bytes per second for each destination's background push after switchover. */
  postcopyBandwidth?: number;
  /** Threads that check the scatter's pages against their digests; none (0, the default): this one does. */
  digestThreads?: number;
  /** Where each VM's state is saved once it runs here, for a gather restarted with --resume; null: not saved. */
  stateDir: string | null;
  /** Recover VMs whose gather died after they ran here, from their saved states, instead of listening for a scatter. */
  resume?: boolean;
  /**
   * How to start each VM's monitor holder (qmp/monitor-holder.ts), which
   * keeps a --resume possible even when the destination's main loop waits
   * for a page; it is run with the QMP address and its socket appended.
   * Unused without a state dir; without it, the gather talks to QEMU directly.
   */
  holderCommand?: string[];
  signal?: AbortSignal;
  log?: (line: string) => void;
  /** Called once the gather listens, with the port it got. */
  onListening?: (port: number) => void;
  /** Given, once it listens, what tells where each VM stands. */
  onProgress?: (source: ProgressSource) => void;
}

export interface GatherReport {
  ok: boolean;
  vms: ArrivalReport[];
  /** Bytes received, frames included: from the scatter directly, and from relays. */
  bytesFromScatter: number;
  bytesFromRelays: number;
  /** The most page bytes the gather held at once (pinned by the scatter, or owed to a destination). */
  peakHeldBytes: number;
  relays: FetcherStats["relays"];
  exitCode: number;
}

/**
 * The gather stops reading its scatter while it holds more than this of
 * pages its destinations have yet to take, and reads on below HELD_LOW.
 * Besides these it holds what the scatter keeps pinned here (GatherPins in
 * scatter/: 32 MiB and the unpins on their way), which only the scatter's
 * frames release, so that never stops the reading (content-directory.ts).
 * Its memory does not grow with the VMs it gathers.
 */
const HELD_HIGH = 32 * 1024 * 1024;
const HELD_LOW = 24 * 1024 * 1024;

interface Shared {
  arrivals: Map<string, VmArrival>;
  socketDir: string;
  psk: Uint8Array;
  tls: TlsFiles | null;
  limiter: RateLimiter | null;
  digestPool: DigestPool | null;
  postcopyBandwidth: number | undefined;
  /** Per VM name: where its state is saved (see resume-state.ts), or null. */
  statePaths: Map<string, string | null>;
  log: (line: string) => void;
}

export async function runGather(options: GatherOptions): Promise<GatherReport> {
  const log = options.log ?? (() => {});
  // socket reads are garbage at once: collected often, they do not add up to the VM
  collectGarbageEvery(16 * 1024 * 1024);
  options.signal?.throwIfAborted();
  if (options.resume && options.stateDir === null) throw new SgmError("usage", "--resume needs the --state-dir the gather before it saved to");
  if (options.stateDir !== null) prepareStateDir(options.stateDir);
  const statePaths = new Map(options.vms.map((vm) => [vm.name, options.stateDir === null ? null : resumeStatePath(options.stateDir, vm.name, vm.qmp)]));
  const holder = (name: string): HolderPlan | null => {
    const statePath = statePaths.get(name);
    return statePath && options.holderCommand ? { command: options.holderCommand, socketPath: holderSocketPath(statePath) } : null;
  };
  let arrivals: VmArrival[];
  let toResume: Awaited<ReturnType<typeof openForResume>> | null = null;
  if (options.resume) {
    toResume = await openForResume(options.vms.map((vm) => ({ ...vm, statePath: statePaths.get(vm.name)!, holder: holder(vm.name) })), log);
    arrivals = [...toResume.ready.map((r) => r.arrival), ...toResume.done];
  } else arrivals = (await openDestinations(options.vms.map((vm) => ({ ...vm, holder: holder(vm.name) })), log)).map((d) => new VmArrival(d));
  const dests = arrivals.map((a) => a.dest);
  const shared: Shared = {
    arrivals: new Map(arrivals.map((a) => [a.name, a])),
    socketDir: mkdtempSync(join(tmpdir(), "sgm-gather-")),
    psk: options.psk,
    tls: options.tls ?? null,
    limiter: options.maxRate ? new RateLimiter(options.maxRate) : null,
    digestPool: (options.digestThreads ?? 0) > 0 ? new DigestPool(options.digestThreads!) : null,
    postcopyBandwidth: options.postcopyBandwidth,
    statePaths,
    log,
  };
  const sessions: ScatterSession[] = [];
  const onAbort = () => {
    const reason = asSgmError(options.signal?.reason ?? new SgmError("interrupted", "interrupted"));
    for (const a of shared.arrivals.values()) a.fail(reason);
  };
  options.signal?.addEventListener("abort", onAbort);

  let resumed: Promise<RelayFetcher[]> = Promise.resolve([]);
  let listener: PeerListener | null = null;
  if (toResume) resumed = resumeAll(toResume.ready, shared);
  else {
    listener = listenPeers({
      host: options.listen.host,
      port: options.listen.port,
      psk: options.psk,
      tls: options.tls,
      role: "gather",
      acceptRoles: ["scatter"],
      maxPayload,
      onConnection: (conn) => {
        log(`scatter connected from ${conn.remoteAddress}`);
        sessions.push(new ScatterSession(conn, shared));
      },
      onRejected: (address, err) => log(`dropped ${address}: ${err.message}`),
    });
    try {
      options.onListening?.(listener.port);
    } catch (err) {
      // nothing is arriving yet: let go of everything and say why
      options.signal?.removeEventListener("abort", onAbort);
      listener.close();
      for (const d of dests) d.close();
      shared.digestPool?.close();
      rmSync(shared.socketDir, { recursive: true, force: true });
      throw err;
    }
    log(`listening on ${options.listen.host}:${listener.port} for ${[...shared.arrivals.keys()].join(", ")}`);
  }

  options.onProgress?.(() => [...shared.arrivals.values()].map((a) => a.snapshot()));
  let fetchers: RelayFetcher[] = [];
  try {
    await Promise.all([...shared.arrivals.values()].map((a) => a.done));
  } finally {
    options.signal?.removeEventListener("abort", onAbort);
    listener?.close();
    // a VM that failed while its state was written lets go of pages only once written: the relays must hear of them first
    await Promise.all([...shared.arrivals.values()].map((a) => a.stateWritten));
    for (const s of sessions) s.close();
    fetchers = await resumed;
    for (const f of fetchers) f.close();
    for (const d of dests) d.close();
    shared.digestPool?.close();
    rmSync(shared.socketDir, { recursive: true, force: true });
  }
  const reports = [...[...shared.arrivals.values()].map((a) => a.report()), ...(toResume?.unresumable ?? []).map(unresumableReport)];
  const failures = reports.filter((r) => !r.ok);
  const relays = [...sessions.map((s) => s.fetcher), ...fetchers].flatMap((f) => f.stats.relays);
  return {
    ok: failures.length === 0,
    vms: reports,
    bytesFromScatter: sessions.reduce((n, s) => n + s.conn.bytesReceived - s.probeBytes, 0),
    bytesFromRelays: relays.reduce((n, r) => n + r.bytesIn, 0),
    peakHeldBytes: sessions.reduce((n, s) => n + s.peakHeldBytes, 0),
    relays,
    exitCode: failures.length === 0 ? 0 : Math.max(...failures.map((r) => r.exitCode ?? 70)),
  };
}

async function openDestinations(vms: ReadonlyArray<{ name: string; qmp: string; holder: HolderPlan | null }>, log: (line: string) => void): Promise<DestinationQemu[]> {
  const opened = await Promise.allSettled(vms.map((vm) => DestinationQemu.open(vm.name, parseQmpAddress(vm.qmp), vm.holder, log)));
  const dests = opened.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
  const refused = opened.find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (refused) {
    for (const d of dests) d.close();
    throw asSgmError(refused.reason);
  }
  return dests;
}

/**
 * One scatter connection (one run): its frames, in order, applied to the VMs
 * it names, with the run's own content directory and relays.
 */
class ScatterSession {
  readonly conn: PeerConnection;
  readonly fetcher: RelayFetcher;
  private readonly shared: Shared;
  private readonly dir: ContentDirectory;
  private readonly vms = new Map<number, VmArrival>();
  /** Why reading the scatter's frames is paused now. */
  private readonly holds = new Set<string>();
  /** The scatter's frames in order, PAGE_DATA checked first. */
  private readonly frames: CheckedFrames;
  private resumeTimer: ReturnType<typeof setTimeout> | null = null;
  /** PAGE_DATA payload bytes taken in, and how many of them the scatter has been told of. */
  private dataTaken = 0;
  private dataReported = 0;
  /** Bytes of the scatter's rate probes (frame headers included): not the run's. */
  probeBytes = 0;
  /** The run's relays, for a VM's saved state. */
  private savedRun: SavedRun = { run: "", relays: [] };

  constructor(conn: PeerConnection, shared: Shared) {
    this.conn = conn;
    this.shared = shared;
    this.dir = new ContentDirectory((cid, digest, mask) => this.fetcher.release(cid, digest, mask));
    this.fetcher = new RelayFetcher(this.dir, shared.limiter, {
      error: (err) => this.failAll(asSgmError(err)),
      lost: (address, reason, lost) => this.relaysLost(address, reason, lost),
      unreachable: (cid, why, relayGone) => {
        for (const a of this.vms.values()) a.contentUnreachable(cid, why, relayGone);
      },
    });
    this.frames = new CheckedFrames(shared.digestPool, {
      apply: (type, payload) => this.apply(type, payload),
      receive: (digests, digestAt, page) => this.receive(digests, digestAt, page),
      tookData: (bytes) => this.tookData(bytes),
      pause: () => this.hold("checks"),
      resume: () => this.unhold("checks"),
      fail: (err) => this.conn.abort(err.kind === "data" ? new SgmError("data", `${this.conn.remoteAddress}: ${err.message}`, { cause: err }) : err),
    });
    conn.onFrame((type, payload) => this.onFrame(type, payload));
    void conn.closed.then(async (reason) => {
      // frames read before a clean close are the scatter's last word: applied first
      if (reason) this.frames.drop();
      else await this.frames.whenIdle();
      this.onClosed(reason ?? this.frames.failure ?? undefined);
    });
  }

  get peakHeldBytes(): number {
    return this.dir.peakBytes;
  }

  /** The gather is done: the relays may let go of everything this run placed, whether or not the scatter has gone. */
  close(): void {
    if (this.resumeTimer) clearTimeout(this.resumeTimer);
    this.releasePins();
    this.fetcher.close();
  }

  private onFrame(type: number, payload: Uint8Array): void {
    this.throttle(payload.length + 8);
    this.frames.take(type, payload);
  }

  /** A checked page from the scatter (checked-frames.ts). */
  private receive(digests: Uint8Array, digestAt: number, page: Uint8Array): void {
    this.dir.receive(this.dir.intern(digests, digestAt), page);
  }

  private tookData(bytes: number): void {
    this.dataTaken += bytes;
    if (this.dir.owedBytes > HELD_HIGH) this.holdWhileFull();
    // the scatter keeps little direct content in flight: tell it often
    if (this.dataTaken - this.dataReported >= 128 * 1024) {
      this.dataReported = this.dataTaken;
      this.send({ t: "received", bytes: this.dataTaken });
    }
  }

  /** Any frame but PAGE_DATA, in the order they came (checked-frames.ts). */
  private apply(type: number, payload: Uint8Array): void {
    switch (type) {
      case FrameType.LOCATIONS:
        readLocations(payload, (digestAt, mask) => {
          const cid = this.dir.intern(payload, digestAt);
          // a relay lost since the scatter learned where this is holds nothing
          this.dir.locate(cid, mask & ~this.fetcher.lostMask);
          this.fetcher.located(cid);
        });
        return;
      case FrameType.UNPIN:
        readDigests(payload, (digestAt) => {
          const cid = this.dir.lookup(payload, digestAt);
          if (cid >= 0) this.dir.unpin(cid);
        });
        return;
      case FrameType.PAGE_MAP:
        readPageMap(payload, (vm, block, page, digestAt) => {
          const arrival = this.vm(vm);
          let cid = digestAt === ENTRY_PENDING ? PENDING : ZERO;
          if (digestAt >= 0) {
            cid = this.dir.lookup(payload, digestAt);
            if (cid < 0) throw new SgmError("data", `VM ${arrival.name}: page map names content the gather was never told of`);
          }
          arrival.map(block, page, cid);
        });
        return;
      case FrameType.VM_BYTES: {
        const m = decodeVmBytes(payload);
        const arrival = this.vm(m.vm);
        if (m.kind === VmBytesKind.HEADER) arrival.setHeader(m.bytes);
        else arrival.addDeviceState(m.bytes, m.last);
        return;
      }
      case FrameType.CONTROL:
        this.onControl(decodeControl(payload));
        return;
      case ProbeFrame.PROBE:
        // answered once read, after the throttle above: the scatter measures the rate this gather takes
        this.probeBytes += payload.length + 8;
        this.conn.send(ProbeFrame.PROBE_ACK, encodeProbeAck(payload));
        return;
      default:
        throw new SgmError("data", `scatter sent frame type ${type}`);
    }
  }

  private onControl(message: Control): void {
    switch (message.t) {
      case "relays": {
        this.savedRun = { run: message.run, relays: message.relays };
        if (message.relays.length === 0) return;
        // nothing may be applied until the relays are reachable
        this.hold("relays");
        this.fetcher.connect(Buffer.from(message.run, "hex"), message.relays, this.shared.psk, this.shared.tls).then(
          () => this.unhold("relays"),
          (err: unknown) => {
            this.shared.log(`cannot reach the run's relays: ${asSgmError(err).message}`);
            this.conn.abort(asSgmError(err));
          },
        );
        return;
      }
      case "check": {
        const arrival = this.shared.arrivals.get(message.name);
        this.send({ t: "check-result", vm: message.vm, refusal: this.refusal(message), qemu: arrival?.dest.qemuVersion ?? null, machine: arrival?.dest.machine ?? null });
        return;
      }
      case "offer": {
        const arrival = this.shared.arrivals.get(message.name);
        const reason = this.refusal(message);
        if (reason || !arrival) {
          this.send({ t: "refuse", vm: message.vm, reason: reason ?? "" });
          return;
        }
        this.vms.set(message.vm, arrival);
        arrival.offer(message.vm, message, (m) => this.send(m));
        this.shared.log(`${message.name}: arriving from QEMU ${message.qemu}`);
        return;
      }
      case "blocks": {
        const arrival = this.vm(message.vm);
        // nothing else may be applied until the destination stream exists
        this.hold("destination");
        const content = {
          dir: this.dir,
          fetch: (cid: number, urgent: boolean) => this.fetcher.want(cid, urgent),
          fromSource: (block: number, page: number) => this.send({ t: "want", vm: message.vm, block, page }),
        };
        const saving = {
          statePath: this.shared.statePaths.get(arrival.name) ?? null,
          run: () => this.savedRun,
          log: this.shared.log,
        };
        arrival.start(message.blocks, message.sectionId, content, this.shared.socketDir, saving, this.shared.postcopyBandwidth).then(
          () => this.unhold("destination"),
          (err: unknown) => {
            arrival.fail(asSgmError(err));
            this.unhold("destination");
          },
        );
        return;
      }
      case "source-done":
        // pins stay until the scatter goes: a VM it has not offered yet (one
        // waiting for a slot) may still name any content the run placed
        this.vm(message.vm).sourceDone(message.stoppedAt, message.map);
        return;
      case "source-switched":
        this.vm(message.vm).sourceSwitched(message.stoppedAt);
        return;
      case "source-restarted":
        this.vm(message.vm).sourceRestarted();
        return;
      case "switch-go": {
        const arrival = this.vm(message.vm);
        arrival.switchGo().then(
          () => this.shared.log(`${arrival.name}: running here`),
          (err: unknown) => arrival.fail(asSgmError(err)),
        );
        return;
      }
      case "failed":
        this.vm(message.vm).fail(new SgmError(message.kind === "data" ? "data" : "unavailable", `VM ${this.vm(message.vm).name}: scatter: ${message.reason}`));
        return;
      default:
        throw new SgmError("data", `scatter sent '${message.t}'`);
    }
  }

  /** Why this gather would not take the VM offered, or null if it would. */
  private refusal(offer: { name: string; qemu: string; machine: string }): string | null {
    const arrival = this.shared.arrivals.get(offer.name);
    if (!arrival) return `no destination for VM ${offer.name} here (not a --vm of this gather)`;
    if (arrival.isTaken) return `VM ${offer.name} is already arriving`;
    if (arrival.dest.machine !== offer.machine) {
      return `machine types differ: the source (QEMU ${offer.qemu}) runs ${offer.machine}, the destination (QEMU ${arrival.dest.qemuVersion}) ${arrival.dest.machine}; QEMU migrates only between equal machine types`;
    }
    return null;
  }

  /** Holds the scatter's connection to --max-rate: reading waits while the bucket is in debt. */
  private throttle(bytes: number): void {
    const limiter = this.shared.limiter;
    if (!limiter) return;
    limiter.take(bytes);
    const wait = limiter.waitMs();
    if (wait <= 0 || this.resumeTimer) return;
    limiter.scatterWaiting = true;
    this.hold("rate");
    this.resumeTimer = setTimeout(() => {
      this.resumeTimer = null;
      limiter.scatterWaiting = false;
      this.unhold("rate");
    }, wait);
  }

  /** Takes no more from the scatter until the destinations have taken what they are owed. */
  private holdWhileFull(): void {
    if (this.holds.has("memory")) return;
    this.hold("memory");
    void this.dir.whenOwedBelow(HELD_LOW).then(() => this.unhold("memory"));
  }

  /** Reading the scatter's frames stops while any reason holds it. */
  private hold(reason: string): void {
    this.holds.add(reason);
    this.conn.pauseReading();
  }

  private unhold(reason: string): void {
    this.holds.delete(reason);
    if (this.holds.size === 0) this.conn.resumeReading();
  }

  private vm(id: number): VmArrival {
    const arrival = this.vms.get(id);
    if (!arrival) throw new SgmError("data", `${this.conn.remoteAddress}: frame for VM id ${id}, which was never offered`);
    return arrival;
  }

  private releasePins(): void {
    this.dir.unpinAll();
    this.fetcher.flushAllReleases();
  }

  /**
   * Names the VMs that needed what only lost relays held (they fail, or
   * wait for their source to stream again), and those that go on. The
   * scatter hears of it: it may still have a connection to the relay, and
   * must count it as gone all the same.
   */
  private relaysLost(address: string, reason: string, lost: number): void {
    this.dir.forgetRelays(lost);
    this.send({ t: "relay-lost", address, reason });
    const spared = [...this.vms.values()].filter((a) => a.relaysLost(address, reason, lost, this.dir) === "unharmed" && a.isOpen);
    if (spared.length > 0) this.shared.log(`relay ${address} went away (${reason}); ${spared.map((a) => a.name).join(", ")} needed nothing only it held, and go on`);
  }

  private failAll(reason: SgmError): void {
    for (const arrival of this.vms.values()) arrival.fail(reason);
  }

  private onClosed(reason: Error | undefined): void {
    const why = reason?.message ?? "connection closed";
    this.shared.log(reason ? `scatter ${this.conn.remoteAddress}: ${why}` : `scatter ${this.conn.remoteAddress} left`);
    for (const arrival of this.vms.values()) arrival.onScatterLost(why);
    this.releasePins();
  }

  private send(message: Control): void {
    try {
      this.conn.send(FrameType.CONTROL, encodeControl(message));
    } catch {
      // the peer is gone; onClosed handles it
    }
  }
}
