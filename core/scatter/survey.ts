// Everything a scatter learns before the first byte of migration: it
// connects to the gather and to every named relay, asks each relay how much
// room it has for this run, estimates what the VMs will send, times the
// gather and each relay with a rate probe, and plans which relays to use.
// Nothing here touches a VM.

import { PAGE_BYTES } from "../dedup/digest.ts";
import { asSgmError, SgmError } from "../errors.ts";
import { formatHostPort, type HostPort } from "../net/host-port.ts";
import { formatBytes } from "../units.ts";
import { PeerConnection, type TlsFiles } from "../wire/connection.ts";
import { maxPayload } from "../wire/messages.ts";
import { probeRate } from "./rate-probe.ts";
import { askRelayFigures } from "./questions.ts";
import { type LeftOut, type PlanInput, planRelays, type RelayCandidate, type RelayPlan } from "./relay-plan.ts";
import type { SourceQemu } from "./source-qemu.ts";

export interface PlanOptions {
  gather: HostPort;
  vms: Array<{ name: string; qmp: string }>;
  relays?: HostPort[];
  replicas?: number;
  psk: Uint8Array;
  /** TLS under the key on every connection; none by default. */
  tls?: TlsFiles | null;
  /** The source's sending rate, bytes a second; measured with rate probes when absent. */
  sourceRate?: number;
  /** Use every reachable relay with room, not only those the rule needs. */
  allRelays?: boolean;
  gatherWaitMs?: number;
  /** The gather's connection, made already (evacuate connects to every gather at once); the run owns it from here. */
  gatherConnection?: PeerConnection;
  signal?: AbortSignal;
  log?: (line: string) => void;
}

export interface SurveyOptions {
  gather: HostPort;
  relays: HostPort[];
  psk: Uint8Array;
  tls: TlsFiles | null;
  replicas: number;
  /** The source's sending rate in bytes a second; measured when absent. */
  sourceRate?: number;
  /** Use every reachable relay with room (--all-relays). */
  useAll: boolean;
  /** Plan even without relays, for the expected eviction time (--plan); otherwise a run without relays has no plan. */
  planAlways: boolean;
  gatherWaitMs: number;
  gatherConnection?: PeerConnection;
  signal?: AbortSignal;
  log: (line: string) => void;
}

export interface Survey {
  gather: PeerConnection;
  /** The chosen relays' connections, in the plan's order. */
  relays: Array<{ address: string; conn: PeerConnection; free: number }>;
  /** Null for a run without relays that was not asked for a plan: nothing to choose, nothing probed. */
  plan: RelayPlan | null;
  /** What the plan was made from, to plan again with what the relays granted. */
  input: PlanInput | null;
}

const address = (hp: HostPort) => formatHostPort(hp.host, hp.port);

/** On a throw every connection it made is closed. */
export async function survey(options: SurveyOptions, sources: readonly SourceQemu[], run: string): Promise<Survey> {
  const opens: PeerConnection[] = [];
  try {
    const gather = options.gatherConnection ?? (await connectGather(options));
    opens.push(gather);
    options.log(`connected to the gather at ${gather.remoteAddress}`);
    const unreachable: LeftOut[] = [];
    const full: LeftOut[] = [];
    const reached: Array<{ address: string; conn: PeerConnection; free: number }> = [];
    const answers = await Promise.allSettled(
      options.relays.map(async (r) => {
        const conn = await connectPeer(r, options.psk, "relay", options.tls);
        opens.push(conn);
        return { conn, figures: await askRelayFigures(conn, address(r), run, options.signal) };
      }),
    );
    answers.forEach((answer, i) => {
      const where = address(options.relays[i]!);
      if (answer.status === "rejected") unreachable.push({ address: where, reason: asSgmError(answer.reason).message });
      else if (answer.value.figures.free < PAGE_BYTES) full.push({ address: where, reason: `it has no room for this run (${formatBytes(answer.value.figures.free)} free)` });
      else reached.push({ address: where, conn: answer.value.conn, free: answer.value.figures.free });
    });
    for (const u of [...unreachable, ...full]) options.log(`relay ${u.address} left out: ${u.reason}`);

    if (options.relays.length === 0 && !options.planAlways) return { gather, relays: [], plan: null, input: null };
    const vms = await Promise.all(sources.map((s) => s.estimate()));
    // one peer at a time for its own rate, then all at once for the source's
    const destinationRate = await probeRate(gather, "the gather", undefined, options.signal);
    const candidates: RelayCandidate[] = [];
    for (const r of reached) {
      options.signal?.throwIfAborted();
      const rate = await probeRate(r.conn, `relay ${r.address}`, undefined, options.signal).catch((err: unknown) => {
        options.signal?.throwIfAborted();
        unreachable.push({ address: r.address, reason: asSgmError(err).message });
        return null;
      });
      if (rate !== null) candidates.push({ address: r.address, free: r.free, rate });
    }
    const probed = reached.filter((r) => candidates.some((c) => c.address === r.address));
    // never below what the gather alone took: the source sent that much
    const sourceRate = options.sourceRate ?? Math.max(destinationRate, await measureSourceRate(gather, probed, options.signal));
    const input: PlanInput = {
      vms,
      sourceRate,
      sourceRateFrom: options.sourceRate === undefined ? "measured" : "--source-rate",
      destinationRate,
      candidates,
      unreachable,
      full,
      replicas: options.replicas,
      useAll: options.useAll,
    };
    const plan = planRelays(input);
    const chosen = plan.chosen.map((c) => reached.find((r) => r.address === c.address)!);
    for (const conn of opens) if (conn !== gather && !chosen.some((r) => r.conn === conn)) conn.close();
    return { gather, relays: chosen, plan, input };
  } catch (err) {
    for (const conn of opens) conn.abort();
    throw err;
  }
}

/** What the source sends the gather and every relay at once: its own rate, unless they are slower together. */
async function measureSourceRate(gather: PeerConnection, relays: ReadonlyArray<{ address: string; conn: PeerConnection }>, signal?: AbortSignal): Promise<number> {
  const rates = await Promise.allSettled([probeRate(gather, "the gather", undefined, signal), ...relays.map((r) => probeRate(r.conn, `relay ${r.address}`, undefined, signal))]);
  signal?.throwIfAborted();
  // a peer that fails this second probe adds nothing (its connection is dropped, and the run finds out); a gather gone fails the run when it starts
  return rates.reduce((sum, rate) => sum + (rate.status === "fulfilled" ? rate.value : 0), 0);
}

export function connectPeer(to: HostPort, psk: Uint8Array, expectRole: "gather" | "relay", tls: TlsFiles | null): Promise<PeerConnection> {
  return PeerConnection.connect({ host: to.host, port: to.port, psk, tls, role: "scatter", expectRole, maxPayload, timeoutMs: 10_000 });
}

/** A gather started a little after the scatter is waited for, up to gatherWaitMs. */
export async function connectGather(options: Pick<SurveyOptions, "gather" | "psk" | "tls" | "gatherWaitMs" | "signal" | "log">): Promise<PeerConnection> {
  const deadline = Date.now() + options.gatherWaitMs;
  let said = false;
  for (;;) {
    try {
      return await connectPeer(options.gather, options.psk, "gather", options.tls);
    } catch (err) {
      const e = asSgmError(err);
      // only a gather that is not listening yet is worth waiting for
      if (!/connection refused/.test(e.message) || Date.now() >= deadline) throw e;
      if (!said) options.log(`waiting for the gather at ${address(options.gather)}`);
      said = true;
      options.signal?.throwIfAborted();
      await Bun.sleep(250);
    }
  }
}

/** The error a shortfall stops a run with: nothing has moved, every VM runs on at the source. */
export function shortfallError(plan: RelayPlan): SgmError | null {
  if (!plan.shortfall) return null;
  return new SgmError(plan.shortfall.kind === "no-relay" ? "unavailable" : "insufficient", plan.shortfall.message);
}

export function surveyOptions(options: PlanOptions, planAlways: boolean): SurveyOptions {
  return {
    gather: options.gather,
    relays: options.relays ?? [],
    psk: options.psk,
    tls: options.tls ?? null,
    replicas: options.replicas ?? 1,
    sourceRate: options.sourceRate,
    useAll: options.allRelays ?? false,
    planAlways,
    gatherWaitMs: options.gatherWaitMs ?? 30_000,
    gatherConnection: options.gatherConnection,
    signal: options.signal,
    log: options.log ?? (() => {}),
  };
}

/** Bad relay arguments are a usage error before anything is touched. */
export function checkRelayArgs(options: Pick<PlanOptions, "relays" | "replicas">): void {
  const replicas = options.replicas ?? 1;
  const relays = options.relays ?? [];
  if (relays.length > 32) throw new SgmError("usage", `--via: ${relays.length} relays; at most 32`);
  if (relays.length > 0 && replicas > relays.length) throw new SgmError("usage", `--replicas ${replicas}: only ${relays.length} relays given`);
}
