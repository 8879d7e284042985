// The scatter role: evicts every VM it is given at once, sending pages to
// the gather while it takes them and to relays otherwise, with one dedup
// index across the VMs.

import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PAGE_BYTES } from "../dedup/digest.ts";
import { asSgmError, SgmError } from "../errors.ts";
import { formatHostPort, type HostPort } from "../net/host-port.ts";
import { formatBytes } from "../units.ts";
import { parseQmpAddress } from "../qmp/client.ts";
import { PeerConnection } from "../wire/connection.ts";
import { decodeControl, encodeControl, FrameType, maxPayload } from "../wire/messages.ts";
import { type PlacementStats, RunPlacement } from "./placement.ts";
import { askRelayRoom } from "./relay-link.ts";
import { SourceQemu } from "./source-qemu.ts";
import { type EvictionReport, type SwitchoverMode, VmEviction } from "./vm-eviction.ts";

/**
 * Postcopy after two passes, measured (test/benchmarks/switchover.bench.ts):
 * idle and moderately busy guests converge within two passes and switch over
 * as in precopy, same figures; a guest that dirties faster than any link
 * never converges in precopy (26 passes, 6.3 GiB sent for 256 MiB in 30 s)
 * and is evicted in 2.6 s this way.
 */
export const DEFAULT_SWITCHOVER: SwitchoverMode = "postcopy";
export const DEFAULT_POSTCOPY_AFTER_PASS = 2;
/**
 * With precopy switchover, passes the source may make before scatter gives
 * up: VMs that converge at all do so within a few (two, measured for an
 * idle and a moderately busy guest), and one that has not by 30 will not.
 */
export const DEFAULT_MAX_PASSES = 30;

export interface ScatterOptions {
  gather: HostPort;
  vms: Array<{ name: string; qmp: string }>;
  relays?: HostPort[];
  /** Relays that hold each relayed page. */
  replicas?: number;
  psk: Uint8Array;
  keepSource: boolean;
  downtimeLimitMs?: number;
  /** How the sources switch over (default: see DEFAULT_SWITCHOVER). */
  switchover?: SwitchoverMode;
  /** In postcopy mode: precopy passes before the switch (0: at once). */
  postcopyAfterPass?: number;
  /** In precopy mode: passes before scatter gives up on convergence (the VM runs on at the source). */
  maxPasses?: number;
  /** Pages of content kept pinned at the gather for dedup (default GATHER_PIN_PAGES). */
  gatherPinPages?: number;
  /** False to send every recurring content again (default true): the cost of no dedup, measured. */
  dedup?: boolean;
  /** How long to keep trying a gather that is not up yet. */
  gatherWaitMs?: number;
  signal?: AbortSignal;
  log?: (line: string) => void;
}

export interface RelayReport {
  address: string;
  /** Pages it holds for this run (replicas counted on each relay). */
  pages: number;
  refusedPages: number;
  bytesSent: number;
}

export interface ScatterReport {
  ok: boolean;
  vms: EvictionReport[];
  /** Bytes on the wire, frames included: to the gather directly, and to each relay. */
  bytesToGather: number;
  relays: RelayReport[];
  placement: PlacementStats;
  /** The exit code the run maps to (0 when every VM was evicted). */
  exitCode: number;
}

const address = (hp: HostPort) => formatHostPort(hp.host, hp.port);

export async function runScatter(options: ScatterOptions): Promise<ScatterReport> {
  const log = options.log ?? (() => {});
  const startedAt = { mono: performance.now(), wall: Date.now() };
  const replicas = options.replicas ?? 1;
  const relayAddresses = options.relays ?? [];
  if (relayAddresses.length > 32) throw new SgmError("usage", `--via: ${relayAddresses.length} relays; at most 32`);
  if (relayAddresses.length > 0 && replicas > relayAddresses.length) {
    throw new SgmError("usage", `--replicas ${replicas}: only ${relayAddresses.length} relays given`);
  }
  options.signal?.throwIfAborted();

  // Every source is checked before anything moves.
  const opened = await Promise.allSettled(options.vms.map((vm) => SourceQemu.open(vm.name, parseQmpAddress(vm.qmp))));
  const sources = opened.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
  const refused = opened.find((r): r is PromiseRejectedResult => r.status === "rejected");
  const opens: PeerConnection[] = [];
  const closeAll = () => {
    for (const s of sources) s.close();
    for (const c of opens) c.abort();
  };
  if (refused) {
    closeAll();
    throw asSgmError(refused.reason);
  }

  let conn: PeerConnection;
  const relays: Array<{ address: string; conn: PeerConnection; room: number }> = [];
  try {
    conn = await connectGather(options, log);
    opens.push(conn);
    log(`connected to the gather at ${conn.remoteAddress}`);
    const reached = await Promise.allSettled(
      relayAddresses.map(async (r) => {
        const relay = await connectPeer(r, options.psk, "relay");
        try {
          const room = await askRelayRoom(relay, address(r));
          if (room < PAGE_BYTES) throw new SgmError("unavailable", `it has no room (${formatBytes(room)} free)`);
          return { relay, room };
        } catch (err) {
          relay.abort();
          throw err;
        }
      }),
    );
    reached.forEach((r, i) => {
      const where = address(relayAddresses[i]!);
      if (r.status === "rejected") {
        log(`relay ${where} left out: ${asSgmError(r.reason).message}`);
        return;
      }
      opens.push(r.value.relay);
      relays.push({ address: where, conn: r.value.relay, room: r.value.room });
    });
    if (relayAddresses.length > 0 && relays.length < replicas) {
      throw new SgmError("unavailable", `only ${relays.length} of ${relayAddresses.length} relays reachable, fewer than --replicas ${replicas}`);
    }
  } catch (err) {
    closeAll();
    throw err;
  }
  if (relays.length > 0) {
    log(`relays: ${relays.map((r) => `${r.address} (${formatBytes(r.room)} free)`).join(", ")}; ${replicas} per page, shared by room`);
  }

  const run = randomBytes(16);
  const placement = new RunPlacement(conn, replicas, { gatherPinPages: options.gatherPinPages, dedup: options.dedup });
  for (const r of relays) placement.addRelay(r.address, r.conn, run, r.room);
  conn.send(FrameType.CONTROL, encodeControl({ t: "relays", run: run.toString("hex"), relays: relays.map((r) => r.address) }));

  const socketDir = mkdtempSync(join(tmpdir(), "sgm-scatter-"));
  const evictions = sources.map(
    (source: SourceQemu, id) =>
      new VmEviction({
        id,
        name: source.name,
        source,
        conn,
        placement,
        socketDir,
        startedAt,
        keepSource: options.keepSource,
        downtimeLimitMs: options.downtimeLimitMs,
        mode: options.switchover ?? DEFAULT_SWITCHOVER,
        postcopyAfterPass: options.postcopyAfterPass ?? DEFAULT_POSTCOPY_AFTER_PASS,
        maxPasses: options.maxPasses ?? DEFAULT_MAX_PASSES,
        log,
      }),
  );

  conn.onFrame((type, payload) => {
    if (type !== FrameType.CONTROL) throw new SgmError("data", `gather sent frame type ${type}`);
    const message = decodeControl(payload);
    if (message.t === "received") {
      placement.gatherReceived(message.bytes);
      return;
    }
    if (!("vm" in message)) throw new SgmError("data", `gather sent '${message.t}'`);
    const eviction = evictions[message.vm];
    if (!eviction) throw new SgmError("data", `gather named unknown VM id ${message.vm}`);
    eviction.onControl(message);
  });
  void conn.closed.then((reason) => {
    for (const e of evictions) e.onDisconnect(reason);
  });
  const onAbort = () => {
    const reason = asSgmError(options.signal?.reason ?? new SgmError("interrupted", "interrupted"));
    for (const e of evictions) e.fail(reason);
  };
  options.signal?.addEventListener("abort", onAbort);

  try {
    const reports = await Promise.all(evictions.map((e) => e.run()));
    const failures = reports.filter((r) => !r.ok);
    return {
      ok: failures.length === 0,
      vms: reports,
      bytesToGather: conn.bytesSent,
      relays: placement.relays.map((r) => ({ address: r.address, pages: r.pagesPut - r.pagesRefused, refusedPages: r.pagesRefused, bytesSent: r.conn.bytesSent })),
      placement: { ...placement.stats },
      exitCode: failures.length === 0 ? 0 : Math.max(...failures.map((r) => r.exitCode ?? 70)),
    };
  } finally {
    options.signal?.removeEventListener("abort", onAbort);
    await conn.whenWritable(0).catch(() => {});
    for (const c of opens) c.close();
    for (const s of sources) s.close();
    rmSync(socketDir, { recursive: true, force: true });
  }
}

function connectPeer(to: HostPort, psk: Uint8Array, expectRole: "gather" | "relay"): Promise<PeerConnection> {
  return PeerConnection.connect({ host: to.host, port: to.port, psk, role: "scatter", expectRole, maxPayload, timeoutMs: 10_000 });
}

/** A gather started a little after the scatter is waited for, up to gatherWaitMs. */
async function connectGather(options: ScatterOptions, log: (line: string) => void): Promise<PeerConnection> {
  const deadline = Date.now() + (options.gatherWaitMs ?? 30_000);
  let said = false;
  for (;;) {
    try {
      return await connectPeer(options.gather, options.psk, "gather");
    } catch (err) {
      const e = asSgmError(err);
      // only a gather that is not listening yet is worth waiting for
      if (!/connection refused/.test(e.message) || Date.now() >= deadline) throw e;
      if (!said) log(`waiting for the gather at ${address(options.gather)}`);
      said = true;
      options.signal?.throwIfAborted();
      await Bun.sleep(250);
    }
  }
}
