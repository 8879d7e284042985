// `sgm gather --resume`: the gather before this one died after its VMs ran
// here, and their destinations paused their postcopy. Each VM comes back
// from its saved state (feed-state.ts), with content from the run's relays
// under the run's id and from the state itself; no scatter is needed, as
// none holds anything of the VM any more.

import { asSgmError } from "../errors.ts";
import type { RateLimiter } from "../net/rate-limiter.ts";
import type { TlsFiles } from "../wire/connection.ts";
import { ContentDirectory } from "./content-directory.ts";
import { DestinationQemu } from "./destination-qemu.ts";
import { RelayFetcher } from "./relay-fetcher.ts";
import { loadResumeState } from "./resume-state.ts";
import type { VmArrival } from "./vm-arrival.ts";
import { parseQmpAddress } from "../qmp/client.ts";

export interface ResumeContext {
  socketDir: string;
  psk: Uint8Array;
  tls: TlsFiles | null;
  limiter: RateLimiter | null;
  postcopyBandwidth: number | undefined;
  log: (line: string) => void;
}

/** Opens each destination, paused; its saved state is read first, so a VM without one touches nothing. */
export async function openPausedDestinations(vms: ReadonlyArray<{ name: string; qmp: string; statePath: string }>): Promise<DestinationQemu[]> {
  for (const vm of vms) loadResumeState(vm.statePath);
  const opened = await Promise.allSettled(vms.map((vm) => DestinationQemu.openPaused(vm.name, parseQmpAddress(vm.qmp))));
  const refused = opened.find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (refused) {
    for (const r of opened) if (r.status === "fulfilled") r.value.close();
    throw asSgmError(refused.reason);
  }
  return opened.map((r) => (r as PromiseFulfilledResult<DestinationQemu>).value);
}

/** Resumes one VM; the fetcher it returns is closed once the VM is done. A VM that cannot resume fails, and says why. */
export async function resumeArrival(arrival: VmArrival, statePath: string, ctx: ResumeContext): Promise<RelayFetcher> {
  const dir = new ContentDirectory((cid, digest, mask) => fetcher.release(cid, digest, mask));
  const fetcher: RelayFetcher = new RelayFetcher(
    dir,
    ctx.limiter,
    (err) => arrival.fail(asSgmError(err)),
    (address, reason, lost) => arrival.relaysLost(address, reason, lost, dir),
  );
  try {
    const state = loadResumeState(statePath);
    if (state.relays.length > 0) await fetcher.connect(Buffer.from(state.run, "hex"), state.relays, ctx.psk, ctx.tls);
    ctx.log(`${arrival.name}: resuming from ${statePath}${state.relays.length ? ` with relays ${state.relays.join(", ")}` : ""}`);
    await arrival.resume(
      state,
      { dir, fetch: (cid, urgent) => fetcher.want(cid, urgent) },
      ctx.socketDir,
      { statePath, run: () => ({ run: state.run, relays: state.relays }), log: ctx.log },
      ctx.postcopyBandwidth,
    );
  } catch (err) {
    arrival.fail(asSgmError(err));
  }
  return fetcher;
}
