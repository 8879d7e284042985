// The gather role: receives every VM bound for this host from the scatter,
// keeps their pages (verified against their digests) and feeds each
// destination QEMU. It exits when every VM it serves completed or failed.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { digestPage, DIGEST_BYTES } from "../dedup/digest.ts";
import { PageStore } from "../dedup/page-store.ts";
import { asSgmError, SgmError } from "../errors.ts";
import { parseQmpAddress } from "../qmp/client.ts";
import { listenPeers, type PeerConnection, type PeerListener } from "../wire/connection.ts";
import {
  type Control,
  decodeControl,
  decodeVmBytes,
  encodeControl,
  FrameType,
  maxPayload,
  readPageData,
  readPageMap,
  VmBytesKind,
} from "../wire/messages.ts";
import { DestinationQemu } from "./destination-qemu.ts";
import { ZERO } from "./page-table.ts";
import { type ArrivalReport, VmArrival } from "./vm-arrival.ts";

export interface GatherOptions {
  listen: { host: string; port: number };
  vms: Array<{ name: string; qmp: string }>;
  psk: Uint8Array;
  /** Bytes per second for each destination's background push after switchover. */
  postcopyBandwidth?: number;
  signal?: AbortSignal;
  log?: (line: string) => void;
  /** Called once the gather listens, with the port it got. */
  onListening?: (port: number) => void;
}

export interface GatherReport {
  ok: boolean;
  vms: ArrivalReport[];
  bytesFromScatter: number;
  exitCode: number;
}

export async function runGather(options: GatherOptions): Promise<GatherReport> {
  const log = options.log ?? (() => {});
  options.signal?.throwIfAborted();
  const opened = await Promise.allSettled(options.vms.map((vm) => DestinationQemu.open(vm.name, parseQmpAddress(vm.qmp))));
  const dests = opened.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
  const refused = opened.find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (refused) {
    for (const d of dests) d.close();
    throw asSgmError(refused.reason);
  }
  const arrivals = new Map(dests.map((d) => [d.name, new VmArrival(d)]));
  const store = new PageStore();
  const socketDir = mkdtempSync(join(tmpdir(), "sgm-gather-"));
  let bytesFromScatter = 0;

  const listener: PeerListener = listenPeers({
    host: options.listen.host,
    port: options.listen.port,
    psk: options.psk,
    role: "gather",
    acceptRoles: ["scatter"],
    maxPayload,
    onConnection: (conn) => {
      log(`scatter connected from ${conn.remoteAddress}`);
      const session = new ScatterSession(conn, arrivals, store, socketDir, log, options.postcopyBandwidth);
      void conn.closed.then(() => {
        bytesFromScatter += conn.bytesReceived;
      });
      void session;
    },
    onRejected: (address, err) => log(`dropped ${address}: ${err.message}`),
  });
  options.onListening?.(listener.port);
  log(`listening on ${options.listen.host}:${listener.port} for ${[...arrivals.keys()].join(", ")}`);

  const onAbort = () => {
    const reason = asSgmError(options.signal?.reason ?? new SgmError("interrupted", "interrupted"));
    for (const a of arrivals.values()) a.fail(reason);
  };
  options.signal?.addEventListener("abort", onAbort);
  try {
    await Promise.all([...arrivals.values()].map((a) => a.done));
  } finally {
    options.signal?.removeEventListener("abort", onAbort);
    listener.close();
    for (const d of dests) d.close();
    rmSync(socketDir, { recursive: true, force: true });
  }
  const reports = [...arrivals.values()].map((a) => a.report());
  const failures = reports.filter((r) => !r.ok);
  return {
    ok: failures.length === 0,
    vms: reports,
    bytesFromScatter,
    exitCode: failures.length === 0 ? 0 : Math.max(...failures.map((r) => r.exitCode ?? 70)),
  };
}

/** One scatter connection: its frames, in order, applied to the VMs it names. */
class ScatterSession {
  private readonly conn: PeerConnection;
  private readonly arrivals: Map<string, VmArrival>;
  private readonly store: PageStore;
  private readonly socketDir: string;
  private readonly log: (line: string) => void;
  private readonly vms = new Map<number, VmArrival>();
  /** Store references held for the scatter, which may name any content it sent again. */
  private pins: number[] = [];
  private readonly scratch = new Uint8Array(DIGEST_BYTES);

  private readonly postcopyBandwidth: number | undefined;

  constructor(
    conn: PeerConnection,
    arrivals: Map<string, VmArrival>,
    store: PageStore,
    socketDir: string,
    log: (line: string) => void,
    postcopyBandwidth: number | undefined,
  ) {
    this.postcopyBandwidth = postcopyBandwidth;
    this.conn = conn;
    this.arrivals = arrivals;
    this.store = store;
    this.socketDir = socketDir;
    this.log = log;
    conn.onFrame((type, payload) => this.onFrame(type, payload));
    void conn.closed.then((reason) => this.onClosed(reason));
  }

  private onFrame(type: number, payload: Uint8Array): void {
    switch (type) {
      case FrameType.PAGE_DATA:
        readPageData(payload, (digestAt, pageAt) => {
          const page = payload.subarray(pageAt, pageAt + 4096);
          digestPage(page, this.scratch);
          for (let i = 0; i < DIGEST_BYTES; i++) {
            if (this.scratch[i] !== payload[digestAt + i]) throw new SgmError("data", `${this.conn.remoteAddress}: page content does not match its digest`);
          }
          const put = this.store.put(payload, digestAt, page);
          if (!put) throw new SgmError("unavailable", "gather page store is full");
          this.pins.push(put.id);
        });
        return;
      case FrameType.PAGE_MAP:
        readPageMap(payload, (vm, block, page, digestAt) => {
          const arrival = this.vm(vm);
          let id = ZERO;
          if (digestAt >= 0) {
            id = this.store.idOf(payload, digestAt);
            if (id < 0) throw new SgmError("data", `VM ${arrival.name}: page map names content that never arrived`);
          }
          arrival.map(block, page, id);
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
      default:
        throw new SgmError("data", `scatter sent frame type ${type}`);
    }
  }

  private onControl(message: Control): void {
    switch (message.t) {
      case "offer": {
        const arrival = this.arrivals.get(message.name);
        const reason = !arrival
          ? `no destination for VM ${message.name} here (not a --vm of this gather)`
          : arrival.isTaken
            ? `VM ${message.name} is already arriving`
            : arrival.dest.machine !== message.machine
              ? `machine types differ: the source (QEMU ${message.qemu}) runs ${message.machine}, the destination (QEMU ${arrival.dest.qemuVersion}) ${arrival.dest.machine}; QEMU migrates only between equal machine types`
              : null;
        if (reason || !arrival) {
          this.send({ t: "refuse", vm: message.vm, reason: reason ?? "" });
          return;
        }
        this.vms.set(message.vm, arrival);
        arrival.offer(message.vm, message, (m) => this.send(m));
        this.log(`${message.name}: arriving from QEMU ${message.qemu}`);
        return;
      }
      case "blocks": {
        const arrival = this.vm(message.vm);
        // nothing else may be applied until the destination stream exists
        this.conn.pauseReading();
        arrival.start(message.blocks, message.sectionId, this.store, this.socketDir, this.postcopyBandwidth).then(
          () => this.conn.resumeReading(),
          (err: unknown) => {
            arrival.fail(asSgmError(err));
            this.conn.resumeReading();
          },
        );
        return;
      }
      case "source-done":
        this.vm(message.vm).sourceDone(message.stoppedAt);
        this.releasePinsIfDone();
        return;
      case "switch-go": {
        const arrival = this.vm(message.vm);
        arrival.switchGo().then(
          () => this.log(`${arrival.name}: running here`),
          (err: unknown) => arrival.fail(asSgmError(err)),
        );
        return;
      }
      case "failed":
        this.vm(message.vm).fail(new SgmError("unavailable", `VM ${this.vm(message.vm).name}: scatter: ${message.reason}`));
        return;
      default:
        throw new SgmError("data", `scatter sent '${message.t}'`);
    }
  }

  private vm(id: number): VmArrival {
    const arrival = this.vms.get(id);
    if (!arrival) throw new SgmError("data", `${this.conn.remoteAddress}: frame for VM id ${id}, which was never offered`);
    return arrival;
  }

  /** Once no source of this scatter streams any more, no content can be named again. */
  private releasePinsIfDone(): void {
    const streaming = [...this.vms.values()].some((a) => a.isStreaming);
    if (streaming) return;
    for (const id of this.pins) this.store.release(id);
    this.pins = [];
  }

  private onClosed(reason: Error | undefined): void {
    const why = reason?.message ?? "connection closed";
    if (reason) this.log(`scatter ${this.conn.remoteAddress}: ${why}`);
    for (const arrival of this.vms.values()) arrival.onScatterLost(why);
    for (const id of this.pins) this.store.release(id);
    this.pins = [];
  }

  private send(message: Control): void {
    try {
      this.conn.send(FrameType.CONTROL, encodeControl(message));
    } catch {
      // the peer is gone; onClosed handles it
    }
  }
}
