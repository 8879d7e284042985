// An eviction in one process: model source and destination QEMUs (see
// source-qemu.ts, destination-qemu.ts) around the real scatter, relay and
// gather engines. A test scripts the guest's pages and gets back both
// reports and every page the destination ended with that differs from the
// source's final memory.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type GatherReport, runGather } from "../../../core/gather/engine.ts";
import { type Relay, startRelay } from "../../../core/relay/engine.ts";
import { runScatter, type ScatterReport } from "../../../core/scatter/engine.ts";
import { EvictionSlots } from "../../../core/scatter/eviction-slots.ts";
import { PeerConnection } from "../../../core/wire/connection.ts";
import type { SwitchoverMode } from "../../../core/scatter/eviction-report.ts";
import { ModelDestinationQemu } from "./destination-qemu.ts";
import { ModelSourceQemu, type SourceScript } from "./source-qemu.ts";

export interface ModelVm {
  name: string;
  script: SourceScript;
  touches?: number[];
}

export interface ModelEvictionOptions {
  vms: ModelVm[];
  relays?: number;
  replicas?: number;
  /** Relay capacity in bytes (default 1 GiB). */
  relayCapacity?: number;
  switchover?: SwitchoverMode;
  postcopyAfterPass?: number;
  maxPasses?: number;
  /** Pages the scatter keeps pinned at the gather (small, so that it unpins often). */
  gatherPinPages?: number;
  /** The scatter's dedup (default on); off sends recurring content again. */
  dedup?: boolean;
  /** The gather's --max-rate. */
  gatherMaxRate?: number;
  /** Digest threads of the scatter, each relay and the gather (default 0: each hashes on its one thread). */
  digestThreads?: number;
  /**
   * The destinations start listening only once their source has sent its
   * first pass: the gather takes nothing meanwhile, so relays must take it,
   * however fast this machine is. Needs relays with room for a whole VM.
   */
  slowDestination?: boolean;
  /** VMs migrating at once, as with evacuate's --max-in-flight: the others are offered as slots come free (default: all). */
  inFlight?: number;
  /** The first relay is stopped once it has taken this many page bytes: a relay lost mid-run. */
  loseRelayAfterBytes?: number;
  /** The first relay is stopped as the first source, in postcopy, has sent its last page. */
  loseRelayAtSourceEnd?: boolean;
  /** In postcopy, each source reports "completed" only once the gather has returned: the gather is done, and gone, first. */
  sourcesCompleteAfterGather?: boolean;
  /** Called as each VM runs at its destination, which reads nothing more until the promise it returns resolves. */
  holdDestinationReading?: (relays: Relay[]) => Promise<void>;
}

export interface PageMismatch {
  page: number;
  /** Content id the source ended with, and what the destination holds (-1: no content id's bytes). */
  source: number;
  destination: number;
}

export interface ModelEvictionResult {
  scatter: ScatterReport;
  gather: GatherReport;
  sources: ModelSourceQemu[];
  destinations: ModelDestinationQemu[];
  /** Per VM, the pages whose destination bytes are not the source's final content. */
  mismatches: Map<string, PageMismatch[]>;
}

const psk = new TextEncoder().encode("model eviction key 0123456789");

export async function runModelEviction(options: ModelEvictionOptions): Promise<ModelEvictionResult> {
  const dir = mkdtempSync(join(tmpdir(), "sgm-model-"));
  const relays: Relay[] = [];
  const gatherReturned = Promise.withResolvers<void>();
  const sources = options.vms.map((vm) => new ModelSourceQemu(dir, vm.name, vm.script, options.sourcesCompleteAfterGather ? gatherReturned.promise : undefined));
  const destinations = options.vms.map(
    (vm, i) =>
      new ModelDestinationQemu(dir, `${vm.name}-in`, {
        blocks: vm.script.blocks,
        touches: vm.touches,
        listenAfter: options.slowDestination ? sources[i]!.firstPassSent : undefined,
        holdReading: options.holdDestinationReading && (() => options.holdDestinationReading!(relays)),
      }),
  );
  let watch: Timer | undefined;
  try {
    for (let r = 0; r < (options.relays ?? 0); r++) {
      relays.push(startRelay({ host: "127.0.0.1", port: 0, psk, capacityBytes: options.relayCapacity ?? 2 ** 30, ttlMs: 600_000, digestThreads: options.digestThreads }));
    }
    if (options.loseRelayAfterBytes !== undefined) {
      const doomed = relays[0]!;
      watch = setInterval(() => {
        if (doomed.stats().bytesIn < options.loseRelayAfterBytes!) return;
        clearInterval(watch);
        void doomed.close();
      }, 1);
    }
    if (options.loseRelayAtSourceEnd) void sources[0]!.completing.then(() => relays[0]!.close());
    const listening = Promise.withResolvers<number>();
    const gathering = runGather({
      listen: { host: "127.0.0.1", port: 0 },
      vms: options.vms.map((vm, i) => ({ name: vm.name, qmp: destinations[i]!.qmpPath })),
      psk,
      maxRate: options.gatherMaxRate,
      digestThreads: options.digestThreads,
      stateDir: join(dir, "state"),
      onListening: (port) => listening.resolve(port),
    });
    gathering.catch((err: Error) => listening.reject(err));
    void gathering.finally(() => gatherReturned.resolve()).catch(() => {});
    const port = await listening.promise;
    const slots = options.inFlight === undefined ? undefined : new EvictionSlots(options.inFlight);
    const scatter = await runScatter({
      slots,
      onPlanned: () => slots?.open(),
      gather: { host: "127.0.0.1", port },
      vms: options.vms.map((vm, i) => ({ name: vm.name, qmp: sources[i]!.qmpPath })),
      relays: relays.map((r) => ({ host: "127.0.0.1", port: r.port })),
      replicas: options.replicas,
      // the model tests follow pages along every path: each relay named is used, whatever the plan would need
      allRelays: true,
      psk,
      keepSource: true,
      switchover: options.switchover,
      postcopyAfterPass: options.postcopyAfterPass,
      maxPasses: options.maxPasses,
      gatherPinPages: options.gatherPinPages,
      dedup: options.dedup,
      digestThreads: options.digestThreads,
    });
    const gather = await gathering;
    const mismatches = new Map<string, PageMismatch[]>();
    options.vms.forEach((vm, n) => {
      const source = sources[n]!.memory.content;
      const held = destinations[n]!.contentIds();
      const wrong: PageMismatch[] = [];
      for (let i = 0; i < source.length; i++) {
        if (held[i] !== source[i]) wrong.push({ page: i, source: source[i]!, destination: held[i]! });
      }
      mismatches.set(vm.name, wrong);
    });
    return { scatter, gather, sources, destinations, mismatches };
  } finally {
    clearInterval(watch);
    await Promise.all(relays.map((r) => r.close()));
    for (const m of [...sources, ...destinations]) m.close();
    rmSync(dir, { recursive: true, force: true });
  }
}


/** The frames a scatter sends its gather in a whole eviction of one small model VM named `name`, for replaying to a gather. */
export async function recordScatterFrames(name: string, script: SourceScript): Promise<Array<{ type: number; payload: Uint8Array }>> {
  const frames: Array<{ type: number; payload: Uint8Array }> = [];
  const { send, sendParts } = PeerConnection.prototype;
  const record = (conn: PeerConnection, type: number, parts: readonly Uint8Array[]) => {
    if (conn.peerRole === "gather") frames.push({ type, payload: new Uint8Array(Buffer.concat(parts)) });
  };
  PeerConnection.prototype.send = function (this: PeerConnection, type, payload) {
    record(this, type, [payload]);
    send.call(this, type, payload);
  };
  PeerConnection.prototype.sendParts = function (this: PeerConnection, type, parts) {
    record(this, type, parts);
    sendParts.call(this, type, parts);
  };
  try {
    const r = await runModelEviction({ vms: [{ name, script }], switchover: "precopy" });
    const wrong = [...r.mismatches.values()].flat();
    if (!r.scatter.ok || !r.gather.ok || wrong.length > 0) throw new Error(`the eviction recorded went wrong: ${wrong.length} pages unlike the source's`);
  } finally {
    PeerConnection.prototype.send = send;
    PeerConnection.prototype.sendParts = sendParts;
  }
  return frames;
}
