// The scatter role: evicts every VM it is given at once, over one
// authenticated connection to the gather, with one dedup index for all.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DigestIndex } from "../dedup/digest-index.ts";
import { asSgmError, SgmError } from "../errors.ts";
import { parseQmpAddress } from "../qmp/client.ts";
import { PeerConnection } from "../wire/connection.ts";
import { decodeControl, FrameType, maxPayload } from "../wire/messages.ts";
import type { SourceQemu } from "./source-qemu.ts";
import { type EvictionReport, VmEviction } from "./vm-eviction.ts";

export interface ScatterOptions {
  gather: { host: string; port: number };
  vms: Array<{ name: string; qmp: string }>;
  psk: Uint8Array;
  keepSource: boolean;
  downtimeLimitMs?: number;
  signal?: AbortSignal;
  log?: (line: string) => void;
}

export interface ScatterReport {
  ok: boolean;
  vms: EvictionReport[];
  /** Bytes on the wire to the gather, frames included. */
  bytesToGather: number;
  /** The exit code the run maps to (0 when every VM was evicted). */
  exitCode: number;
}

export async function runScatter(options: ScatterOptions): Promise<ScatterReport> {
  const log = options.log ?? (() => {});
  const startedAt = { mono: performance.now(), wall: Date.now() };
  options.signal?.throwIfAborted();

  // Every source is checked before anything moves.
  const opened = await Promise.allSettled(options.vms.map((vm) => VmEviction.openSource(vm.name, parseQmpAddress(vm.qmp))));
  const sources = opened.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
  const refused = opened.find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (refused) {
    for (const s of sources) s.close();
    throw asSgmError(refused.reason);
  }

  let conn: PeerConnection;
  try {
    conn = await PeerConnection.connect({
      host: options.gather.host,
      port: options.gather.port,
      psk: options.psk,
      role: "scatter",
      expectRole: "gather",
      maxPayload,
      timeoutMs: 10_000,
    });
  } catch (err) {
    for (const s of sources) s.close();
    throw err;
  }
  log(`connected to the gather at ${conn.remoteAddress}`);

  const socketDir = mkdtempSync(join(tmpdir(), "sgm-scatter-"));
  const index = new DigestIndex();
  const evictions = sources.map(
    (source: SourceQemu, id) =>
      new VmEviction({
        id,
        name: source.name,
        source,
        conn,
        index,
        socketDir,
        startedAt,
        keepSource: options.keepSource,
        downtimeLimitMs: options.downtimeLimitMs,
        log,
      }),
  );

  conn.onFrame((type, payload) => {
    if (type !== FrameType.CONTROL) throw new SgmError("data", `gather sent frame type ${type}`);
    const message = decodeControl(payload);
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
      exitCode: failures.length === 0 ? 0 : Math.max(...failures.map((r) => r.exitCode ?? 70)),
    };
  } finally {
    options.signal?.removeEventListener("abort", onAbort);
    await conn.whenWritable(0).catch(() => {});
    conn.close();
    for (const s of sources) s.close();
    rmSync(socketDir, { recursive: true, force: true });
  }
}
