// Which relays a run uses, decided before any page moves.
//
// The source can send at sourceRate; the destination takes destinationRate
// of it directly. Relays are added, fastest first (the one with more room
// first between equals), until the destination and the chosen relays take
// the source's whole rate and the relays' room holds, `replicas` times over,
// what will not go direct. Choosing the fewest such relays is NP-complete in
// general (Intermediate node selection for Scatter-Gather VM migration); this
// greedy rule is one of that work's heuristics, and a run needs few relays.

import { formatBytes, formatRate } from "../units.ts";

/** Pages a busy guest dirties again while it is read are sent twice: a margin on its RAM. */
export const REDIRTY_MARGIN = 0.1;

export interface VmEstimate {
  name: string;
  ramBytes: number;
  /** RAM a balloon has taken back from the guest, which QEMU sends as zero pages. */
  balloonedBytes: number;
}

export interface RelayCandidate {
  address: string;
  /** Room this run may fill, less what other runs have reserved. */
  free: number;
  /** Bytes a second it took in its probe. */
  rate: number;
}

export interface LeftOut {
  address: string;
  reason: string;
}

export interface PlanInput {
  vms: VmEstimate[];
  sourceRate: number;
  /** Where sourceRate came from: "--source-rate" or "measured". */
  sourceRateFrom: string;
  destinationRate: number;
  candidates: RelayCandidate[];
  /** Named relays that could not be reached or asked. */
  unreachable: LeftOut[];
  /** Named relays that answered with no room for this run. */
  full: LeftOut[];
  replicas: number;
  /** Every reachable relay with room, whatever the rule says (--all-relays). */
  useAll: boolean;
}

export interface ChosenRelay extends RelayCandidate {
  /** Bytes the run expects to place on it, replicas included. */
  expectedBytes: number;
}

export type Shortfall = { kind: "relay-memory" | "no-relay"; message: string };

export interface RelayPlan {
  /** Bytes the VMs are expected to scatter (RAM less ballooned, plus the redirty margin). */
  bytes: number;
  vms: Array<VmEstimate & { bytes: number }>;
  sourceRate: number;
  sourceRateFrom: string;
  destinationRate: number;
  replicas: number;
  chosen: ChosenRelay[];
  leftOut: LeftOut[];
  /** Bytes expected to go straight to the gather, and to relays (once; replicas multiply it). */
  directBytes: number;
  relayedBytes: number;
  /** The eviction time the plan expects, and the least any plan could: the source's rate alone. */
  expectedEvictionMs: number;
  boundMs: number;
  shortfall: Shortfall | null;
}

interface Coverage {
  rate: number;
  free: number;
  seconds: number;
  direct: number;
  /** Relay bytes needed, replicas included. */
  need: number;
}

export function planRelays(input: PlanInput): RelayPlan {
  const vms = input.vms.map((vm) => ({ ...vm, bytes: Math.round(Math.max(0, vm.ramBytes - vm.balloonedBytes) * (1 + REDIRTY_MARGIN)) }));
  const bytes = vms.reduce((sum, vm) => sum + vm.bytes, 0);
  const cover = (set: readonly RelayCandidate[]): Coverage => {
    const rate = input.destinationRate + set.reduce((sum, r) => sum + r.rate, 0);
    const seconds = bytes / Math.max(1, Math.min(input.sourceRate, rate));
    const direct = Math.min(bytes, input.destinationRate * seconds);
    return { rate, free: set.reduce((sum, r) => sum + r.free, 0), seconds, direct, need: (bytes - direct) * input.replicas };
  };
  const covered = (set: readonly RelayCandidate[]): boolean => {
    const c = cover(set);
    return c.rate >= input.sourceRate && c.free >= c.need && (c.need === 0 || set.length >= input.replicas);
  };

  const ranked = [...input.candidates].sort((a, b) => b.rate - a.rate || b.free - a.free || a.address.localeCompare(b.address));
  const chosen: RelayCandidate[] = [];
  const leftOut: LeftOut[] = [...input.unreachable, ...input.full];
  for (const candidate of ranked) {
    if (!input.useAll && covered(chosen)) {
      const c = cover(chosen);
      leftOut.push({
        address: candidate.address,
        reason: chosen.length === 0 ? "not needed: the destination takes the source's whole rate" : `not needed: the relays before it take ${formatRate(c.rate)} with the destination and hold what will not go direct`,
      });
      continue;
    }
    chosen.push(candidate);
  }

  const c = cover(chosen);
  const relayedOnce = Math.min(bytes - c.direct, c.free / input.replicas);
  const shortBy = bytes - c.direct - relayedOnce;
  const reachable = input.candidates.length + input.full.length;
  const named = reachable + input.unreachable.length;
  let shortfall: Shortfall | null = null;
  if (named > 0 && reachable < input.replicas) {
    // relays were named for a reason: too few answering is a fault in the fleet, whatever the rates say
    shortfall = { kind: "no-relay", message: `only ${reachable} of ${named} relays reachable, fewer than --replicas ${input.replicas}` };
  } else if (named > 0 && shortBy > 0) {
    shortfall = {
      kind: "relay-memory",
      message: `the relays have room for ${formatBytes(c.free)} of the ${formatBytes(c.need)} that will not go direct (${input.replicas} ${input.replicas === 1 ? "copy" : "copies"})`,
    };
  } else if (input.full.length > 0 && c.rate < input.sourceRate) {
    // with no room on them the full relays were not counted, and what they would have taken now waits for the destination
    shortfall = {
      kind: "relay-memory",
      message: `${input.full.length} of ${named} relays have no room for this run; the others and the destination take ${formatRate(c.rate)} of the source's ${formatRate(input.sourceRate)}`,
    };
  }
  return {
    bytes,
    vms,
    sourceRate: input.sourceRate,
    sourceRateFrom: input.sourceRateFrom,
    destinationRate: input.destinationRate,
    replicas: input.replicas,
    chosen: chosen.map((r) => ({ ...r, expectedBytes: Math.round(c.free > 0 ? relayedOnce * input.replicas * (r.free / c.free) : 0) })),
    leftOut,
    directBytes: Math.round(c.direct),
    relayedBytes: Math.round(Math.max(0, relayedOnce)),
    // what does not fit on the relays waits for the destination after the rest is scattered
    expectedEvictionMs: Math.round((c.seconds + Math.max(0, shortBy) / Math.max(1, input.destinationRate)) * 1000),
    boundMs: Math.round((bytes / Math.max(1, input.sourceRate)) * 1000),
    shortfall,
  };
}
