// One scatter connection at the gather (one run): its frames, in order,
// applied to the VMs it names, with the run's own content directory and
// relays; what it holds back while destinations are behind.

import type { DigestPool } from "../dedup/digest-pool.ts";
import { asSgmError, SgmError } from "../errors.ts";
import type { RateLimiter } from "../net/rate-limiter.ts";
import { encodeProbeAck, ProbeFrame } from "../wire/probe-frames.ts";
import type { PeerConnection, TlsFiles } from "../wire/connection.ts";
import { peerError } from "../wire/socket-errors.ts";
import { type Control, decodeControl, encodeControl } from "../wire/control.ts";
import { decodeVmBytes, ENTRY_PENDING, FrameType, readLocations, readDigests, readPageMap, VmBytesKind } from "../wire/messages.ts";
import { CheckedFrames } from "./checked-frames.ts";
import { ContentDirectory } from "./content-directory.ts";
import type { SavedRun } from "./feed-state.ts";
import { PENDING, ZERO } from "./page-table.ts";
import { RelayFetcher } from "./relay-fetcher.ts";
import type { VmArrival } from "./vm-arrival.ts";

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

/**
 * How long a gather that is done waits for its scatter to close its side
 * of the connection (see hangUp): once the gather's part is over, what is
 * left to a scatter is its sources' completion, which takes moments.
 */
export const HANG_UP_WAIT_MS = 3000;

/** Holds that stop frames already read (see holdsFrames). */
const HOLDS_FRAMES: ReadonlySet<string> = new Set(["relays", "destination", "memory"]);

/** What every scatter session of one gather shares. */
export interface GatherShared {
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

/**
 * One scatter connection (one run): its frames, in order, applied to the VMs
 * it names, with the run's own content directory and relays.
 */
export class ScatterSession {
  readonly conn: PeerConnection;
  readonly fetcher: RelayFetcher;
  private readonly shared: GatherShared;
  private readonly dir: ContentDirectory;
  private readonly vms = new Map<number, VmArrival>();
  /** Why reading the scatter's frames is paused now. */
  private readonly holds = new Set<string>();
  /** The scatter's frames in order, PAGE_DATA checked first. */
  private readonly frames: CheckedFrames;
  /** Why checked frames failed the connection, should it have closed already. */
  private framesFailure: SgmError | null = null;
  private resumeTimer: ReturnType<typeof setTimeout> | null = null;
  /** PAGE_DATA payload bytes taken in, and how many of them the scatter has been told of. */
  private dataTaken = 0;
  private dataReported = 0;
  /** Set once the gather is done with the scatter: nothing pauses reading from then on. */
  private hangingUp = false;
  /** Bytes of the scatter's rate probes (frame headers included): not the run's. */
  probeBytes = 0;
  /** The run's relays, for a VM's saved state. */
  private savedRun: SavedRun = { run: "", relays: [] };

  constructor(conn: PeerConnection, shared: GatherShared) {
    this.conn = conn;
    this.shared = shared;
    this.dir = new ContentDirectory((cid, mask) => this.fetcher.release(cid, mask));
    this.fetcher = new RelayFetcher(this.dir, shared.limiter, {
      error: (err) => this.failAll(asSgmError(err)),
      lost: (address, reason, lost) => this.relaysLost(address, reason, lost),
      unreachable: (cid, why, relayGone) => {
        for (const a of this.vms.values()) a.contentUnreachable(cid, why, relayGone);
      },
    });
    this.frames = new CheckedFrames(shared.digestPool, {
      apply: (type, payload) => this.apply(type, payload),
      receive: (digests, digestAt, pages, pageAt) => this.receive(digests, digestAt, pages, pageAt),
      tookData: (bytes) => this.tookData(bytes),
      pause: () => this.hold("checks"),
      resume: () => this.unhold("checks"),
      blocked: () => this.holdsFrames(),
      fail: (err) => {
        this.framesFailure ??= peerError(this.conn.remoteAddress, err);
        this.conn.abort(this.framesFailure);
      },
    });
    conn.onFrame((type, payload) => this.onFrame(type, payload));
    void conn.closed.then(async (reason) => {
      // frames read before a clean close go first, as far as their checks and holds let them: the scatter's last word ("failed") may be among them
      if (!reason) await this.frames.whenChecked();
      this.frames.drop();
      this.onClosed(reason ?? this.framesFailure ?? undefined);
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

  /**
   * Reads and drops what the scatter still sends until it closes its side,
   * for at most `ms`, then closes the gather's. A scatter closes once each
   * of its VMs is over, its source's completion included; a process that
   * exits with a peer's bytes unread makes its kernel answer with a reset,
   * and the reset can take with it the scatter's unread copy of the
   * gather's last words (Bun reports the error and reads no more).
   */
  async hangUp(ms: number): Promise<void> {
    this.hangingUp = true;
    this.conn.onFrame(() => {});
    this.conn.resumeReading();
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([this.conn.closed, new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)))]);
    clearTimeout(timer);
    this.conn.close();
  }

  private onFrame(type: number, payload: Uint8Array): void {
    this.throttle(payload.length + 8);
    this.frames.take(type, payload);
  }

  /** A checked page from the scatter (checked-frames.ts). */
  private receive(digests: Uint8Array, digestAt: number, pages: Uint8Array, pageAt: number): void {
    this.dir.receive(this.dir.intern(digests, digestAt), pages, pageAt);
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
    if (!this.hangingUp) this.conn.pauseReading();
  }

  private unhold(reason: string): void {
    this.holds.delete(reason);
    if (this.holds.size === 0) this.conn.resumeReading();
    // frames read before the hold, waiting here, go first
    if (HOLDS_FRAMES.has(reason)) this.frames.proceed();
  }

  /**
   * Frames already read may not be applied now. Applied as they were read,
   * a frame that set one of these holds stopped the rest of what was read
   * with it; rate and checks stop only the reading.
   */
  private holdsFrames(): boolean {
    for (const reason of this.holds) if (HOLDS_FRAMES.has(reason)) return true;
    return false;
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
