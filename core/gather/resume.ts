// `sgm gather --resume`: the gather before this one died after its VMs ran
// here, and their destinations paused their postcopy. Each VM comes back
// from its saved state (feed-state.ts), with content from the run's relays
// under the run's id and from the state itself; no scatter is needed, as
// none holds anything of the VM any more. Each VM stands alone: one that
// cannot resume (no state, its QEMU not paused) fails and says why, and the
// others go on.
//
// VMs of one run share one content directory and one set of relay
// connections, as in the gather that died: a relay holds a content once
// per run, so a release for one VM would drop what another still lacks.

import { asSgmError, SgmError } from "../errors.ts";
import type { RateLimiter } from "../net/rate-limiter.ts";
import { parseQmpAddress } from "../qmp/client.ts";
import type { HolderPlan } from "../qmp/holder-launch.ts";
import type { TlsFiles } from "../wire/connection.ts";
import { ContentDirectory } from "./content-directory.ts";
import { DestinationQemu } from "./destination-qemu.ts";
import { RelayFetcher } from "./relay-fetcher.ts";
import { loadResumeState, type ResumeState } from "./resume-state.ts";
import type { ArrivalReport } from "./arrival-report.ts";
import { VmArrival } from "./vm-arrival.ts";

export interface ResumeContext {
  socketDir: string;
  psk: Uint8Array;
  tls: TlsFiles | null;
  limiter: RateLimiter | null;
  postcopyBandwidth: number | undefined;
  log: (line: string) => void;
}

/** A VM of this gather that could not even be looked at: its report says why. */
export interface Unresumable {
  name: string;
  error: SgmError;
}

interface Ready {
  arrival: VmArrival;
  state: ResumeState;
  statePath: string;
}

/** Reads each VM's state, then opens its destination; a VM without a state touches nothing. */
export async function openForResume(
  vms: ReadonlyArray<{ name: string; qmp: string; statePath: string; holder: HolderPlan | null }>,
  log: (line: string) => void,
): Promise<{ ready: Ready[]; done: VmArrival[]; unresumable: Unresumable[] }> {
  const ready: Ready[] = [];
  const done: VmArrival[] = [];
  const unresumable: Unresumable[] = [];
  await Promise.all(
    vms.map(async (vm) => {
      let state: ResumeState | null = null;
      let missing: SgmError | null = null;
      try {
        state = loadResumeState(vm.statePath);
      } catch (err) {
        // a migration that completed took its state with it: its QEMU says so below
        if (!(err instanceof SgmError && err.kind === "unavailable")) return unresumable.push({ name: vm.name, error: asSgmError(err) });
        missing = err;
      }
      try {
        const { dest, completed } = await DestinationQemu.openPaused(vm.name, parseQmpAddress(vm.qmp), vm.holder, log);
        const arrival = new VmArrival(dest);
        if (completed) {
          log(`${vm.name}: its migration had completed; nothing to resume`);
          arrival.completedBefore();
          done.push(arrival);
        } else if (state) ready.push({ arrival, state, statePath: vm.statePath });
        else {
          dest.close();
          unresumable.push({ name: vm.name, error: missing! });
        }
      } catch (err) {
        // no state says more than what its QEMU is doing
        unresumable.push({ name: vm.name, error: missing ?? asSgmError(err) });
      }
    }),
  );
  return { ready, done, unresumable };
}

/** Resumes the VMs, run by run; returns the relay fetchers, to close once every VM is done. */
export async function resumeAll(ready: Ready[], ctx: ResumeContext): Promise<RelayFetcher[]> {
  const runs = new Map<string, Ready[]>();
  for (const r of ready) {
    // a run without relays shares nothing: each VM alone
    const key = r.state.relays.length > 0 ? r.state.run : `alone:${r.arrival.name}`;
    runs.set(key, [...(runs.get(key) ?? []), r]);
  }
  return Promise.all([...runs.values()].map((vms) => resumeRun(vms, ctx)));
}

async function resumeRun(vms: Ready[], ctx: ResumeContext): Promise<RelayFetcher> {
  const arrivals = vms.map((v) => v.arrival);
  const { run, relays } = vms[0]!.state;
  const dir = new ContentDirectory((cid, mask) => fetcher.release(cid, mask));
  const fetcher: RelayFetcher = new RelayFetcher(dir, ctx.limiter, {
    error: (err) => arrivals.forEach((a) => a.fail(asSgmError(err))),
    lost: (address, reason, lost) => arrivals.forEach((a) => a.relaysLost(address, reason, lost, dir)),
    unreachable: (cid, why, relayGone) => arrivals.forEach((a) => a.contentUnreachable(cid, why, relayGone)),
  });
  let unreachable: Array<{ address: string; reason: string }> = [];
  try {
    if (vms.some((v) => v.state.run !== run || v.state.relays.join() !== relays.join())) throw new SgmError("data", "saved states of one run name different relays");
    if (relays.length > 0) unreachable = await fetcher.connect(Buffer.from(run, "hex"), relays, ctx.psk, ctx.tls, true);
  } catch (err) {
    arrivals.forEach((a) => a.fail(asSgmError(err)));
    return fetcher;
  }
  for (const { arrival, state, statePath } of vms) {
    ctx.log(`${arrival.name}: resuming from ${statePath}${relays.length ? ` with relays ${relays.join(", ")}` : ""}`);
    arrival.claimSaved(
      state,
      { dir, fetch: (cid, urgent) => fetcher.want(cid, urgent) },
      ctx.socketDir,
      { statePath, run: () => ({ run, relays }), log: ctx.log },
      ctx.postcopyBandwidth,
    );
  }
  // what no VM of the run lacks may go now; then the relays that did not answer count as lost
  dir.settleAll();
  for (const { address, reason } of unreachable) {
    ctx.log(`relay ${address} does not answer: ${reason}`);
    arrivals.forEach((a) => a.relaysLost(address, reason, fetcher.lostMask, dir));
  }
  await Promise.all(arrivals.map((a) => a.resumeFeed()));
  return fetcher;
}

export function unresumableReport(u: Unresumable): ArrivalReport {
  const pages = { total: 0, fedPages: 0, discardedPages: 0, deliveredPages: 0, requests: 0, requestedPagesServed: 0, requestedFromRelays: 0, requestedFromSource: 0 };
  return {
    name: u.name,
    ok: false,
    error: u.error.message,
    exitCode: u.error.exitCode,
    qemu: { source: null, destination: "", machine: "" },
    totalMs: null,
    downtimeMs: null,
    bytes: { toQemu: 0 },
    pages,
  };
}
