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
  /** Bytes a second the destination and the relays take together. */
  rate: number;
  seconds: number;
  direct: number;
  /** Distinct bytes the relays must hold, each `replicas` times. */
  need: number;
  /** Distinct bytes the relays can hold `replicas` times, on distinct relays. */
  holdable: number;
}

/** A measured rate is what the peers took; within this it cannot tell the source short. */
const MEASURED_TOLERANCE = 0.9;

export function planRelays(input: PlanInput): RelayPlan {
  const vms = input.vms.map((vm) => ({ ...vm, bytes: Math.round(Math.max(0, vm.ramBytes - vm.balloonedBytes) * (1 + REDIRTY_MARGIN)) }));
  const bytes = vms.reduce((sum, vm) => sum + vm.bytes, 0);
  const r = input.replicas;
  const dest = Math.max(1, input.destinationRate);
  const cover = (set: readonly RelayCandidate[]): Coverage => {
    const relayRate = set.reduce((sum, x) => sum + x.rate, 0);
    // the source sends each relayed byte r times; the receivers take direct bytes once and relayed ones r times
    const sourceBound = (r * bytes) / Math.max(1, input.sourceRate + (r - 1) * dest);
    const receiverBound = (r * bytes) / (r * dest + relayRate);
    const seconds = Math.min(bytes / dest, Math.max(sourceBound, receiverBound));
    const direct = Math.min(bytes, dest * seconds);
    return { rate: dest + relayRate, seconds, direct, need: bytes - direct, holdable: set.length < r ? 0 : holdableOnce(set, r) };
  };
  const covered = (set: readonly RelayCandidate[]): boolean => {
    const c = cover(set);
    return c.rate >= input.sourceRate && c.holdable >= c.need;
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
  const relayedOnce = Math.min(c.need, c.holdable);
  const shortBy = c.need - relayedOnce;
  const reachable = input.candidates.length + input.full.length;
  const named = reachable + input.unreachable.length;
  const copies = `${r} ${r === 1 ? "copy" : "copies"}`;
  const sourceShort = c.rate < input.sourceRate * (input.sourceRateFrom === "measured" ? MEASURED_TOLERANCE : 1);
  let shortfall: Shortfall | null = null;
  if (named > 0 && reachable < r) {
    // relays were named for a reason: too few answering is a fault in the fleet, whatever the rates say
    shortfall = { kind: "no-relay", message: `only ${reachable} of ${named} relays reachable, fewer than --replicas ${r}` };
  } else if (named > 0 && c.need > 0 && input.candidates.length < r) {
    shortfall = { kind: "relay-memory", message: `only ${input.candidates.length} of ${named} relays have room for this run, fewer than --replicas ${r}` };
  } else if (named > 0 && shortBy > 0) {
    shortfall = {
      kind: "relay-memory",
      message: `the relays can hold ${formatBytes(c.holdable)} of the ${formatBytes(c.need)} that will not go direct (${copies})`,
    };
  } else if (input.full.length > 0 && sourceShort) {
    // with no room on them the full relays were not counted, and what they would have taken now waits for the destination
    shortfall = {
      kind: "relay-memory",
      message: `${input.full.length} of ${named} relays have no room for this run; the others and the destination take ${formatRate(c.rate)} of the source's ${formatRate(input.sourceRate)}`,
    };
  }
  const totalFree = chosen.reduce((sum, x) => sum + x.free, 0);
  return {
    bytes,
    vms,
    sourceRate: input.sourceRate,
    sourceRateFrom: input.sourceRateFrom,
    destinationRate: input.destinationRate,
    replicas: input.replicas,
    // placed by room, and no relay holds two copies of a page
    chosen: chosen.map((x) => ({ ...x, expectedBytes: Math.round(Math.min(x.free, relayedOnce, totalFree > 0 ? (r * relayedOnce * x.free) / totalFree : 0)) })),
    leftOut,
    directBytes: Math.round(c.direct),
    relayedBytes: Math.round(Math.max(0, relayedOnce)),
    // what does not fit on the relays waits for the destination after the rest is scattered
    expectedEvictionMs: Math.round((c.seconds + shortBy / dest) * 1000),
    boundMs: Math.round((bytes / Math.max(1, input.sourceRate)) * 1000),
    shortfall,
  };
}

/**
 * The most distinct bytes x the relays can hold `replicas` times with each
 * copy on a different relay: a relay holds at most one copy of each page,
 * so at most min(free, x) of them, and together they must hold replicas·x.
 */
function holdableOnce(set: readonly RelayCandidate[], replicas: number): number {
  const free = set.map((x) => x.free).sort((a, b) => a - b);
  // Σ min(free_i, x) ≥ replicas·x is tightest where x sits between two frees; try each piece
  let best = 0;
  for (let k = 0; k <= free.length; k++) {
    const below = free.slice(0, k).reduce((sum, f) => sum + f, 0);
    const above = free.length - k;
    if (replicas - above <= 0) continue;
    const x = below / (replicas - above);
    const lo = k === 0 ? 0 : free[k - 1]!;
    const hi = k === free.length ? Infinity : free[k]!;
    if (x >= lo && x <= hi) best = Math.max(best, x);
  }
  if (replicas === 1) return free.reduce((sum, f) => sum + f, 0);
  return best;
}
