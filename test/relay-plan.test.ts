// The rule that chooses a run's relays, on figures given outright.

import { describe, expect, test } from "bun:test";
import { type PlanInput, planRelays, REDIRTY_MARGIN } from "../core/scatter/relay-plan.ts";

const MiB = 1 << 20;
const GiB = 1 << 30;

function input(over: Partial<PlanInput>): PlanInput {
  return {
    vms: [{ name: "a", ramBytes: GiB, balloonedBytes: 0 }],
    sourceRate: 250 * MiB,
    sourceRateFrom: "--source-rate",
    destinationRate: 30 * MiB,
    candidates: [],
    unreachable: [],
    full: [],
    replicas: 1,
    useAll: false,
    ...over,
  };
}

describe("relay plan", () => {
  test("relays are added fastest first until the source's rate is taken; the rest are left out as not needed", () => {
    const plan = planRelays(
      input({
        candidates: [
          { address: "slow:1", free: 4 * GiB, rate: 50 * MiB },
          { address: "fast:1", free: 4 * GiB, rate: 125 * MiB },
          { address: "mid:1", free: 4 * GiB, rate: 100 * MiB },
        ],
      }),
    );
    // 30 + 125 + 100 = 255 MiB/s >= 250: the slow one is not needed
    expect(plan.chosen.map((r) => r.address)).toEqual(["fast:1", "mid:1"]);
    expect(plan.leftOut).toEqual([{ address: "slow:1", reason: expect.stringMatching(/^not needed: the relays before it take 255\.0 MiB\/s/) }]);
    expect(plan.shortfall).toBeNull();
    expect(plan.bytes).toBe(Math.round(GiB * (1 + REDIRTY_MARGIN)));
    // at the source's rate, the destination takes 30/250 of it directly
    expect(plan.directBytes).toBe(Math.round(plan.bytes * (30 / 250)));
    expect(plan.boundMs).toBe(plan.expectedEvictionMs);
    // the relayed bytes are shared by room: equal rooms, equal shares
    expect(plan.chosen[0]!.expectedBytes).toBe(plan.chosen[1]!.expectedBytes);
    expect(plan.chosen[0]!.expectedBytes + plan.chosen[1]!.expectedBytes).toBeCloseTo(plan.bytes - plan.directBytes, -2);
  });

  test("memory decides when rates are covered: a relay is added until the room holds what will not go direct", () => {
    const plan = planRelays(
      input({
        candidates: [
          { address: "small:1", free: 256 * MiB, rate: 400 * MiB },
          { address: "big:1", free: 2 * GiB, rate: 300 * MiB },
        ],
      }),
    );
    // the faster relay alone takes the rate but holds 256 MiB of ~990 MiB
    expect(plan.chosen.map((r) => r.address)).toEqual(["small:1", "big:1"]);
    expect(plan.chosen[1]!.expectedBytes).toBeGreaterThan(plan.chosen[0]!.expectedBytes * 7);
  });

  test("a destination as fast as the source needs no relay", () => {
    const plan = planRelays(input({ destinationRate: 300 * MiB, candidates: [{ address: "r:1", free: GiB, rate: 100 * MiB }] }));
    expect(plan.chosen).toEqual([]);
    expect(plan.leftOut[0]!.reason).toBe("not needed: the destination takes the source's whole rate");
    expect(plan.directBytes).toBe(plan.bytes);
  });

  test("too little room on every relay is a memory shortfall naming both figures", () => {
    const plan = planRelays(input({ candidates: [{ address: "r:1", free: 100 * MiB, rate: 500 * MiB }], replicas: 1 }));
    expect(plan.shortfall?.kind).toBe("relay-memory");
    expect(plan.shortfall?.message).toMatch(/^the relays can hold 100\.0 MiB of the 9\d\d\.\d MiB that will not go direct \(1 copy\)$/);
    // what does not fit waits for the destination: slower than the bound
    expect(plan.expectedEvictionMs).toBeGreaterThan(plan.boundMs * 5);
  });

  test("replicas double the room needed and the relays chosen", () => {
    const candidates = [
      { address: "a:1", free: GiB, rate: 500 * MiB },
      { address: "b:1", free: GiB, rate: 500 * MiB },
    ];
    expect(planRelays(input({ candidates, replicas: 1 })).chosen.length).toBe(1);
    const two = planRelays(input({ candidates, replicas: 2 }));
    expect(two.chosen.length).toBe(2);
    expect(two.shortfall).toBeNull();
    expect(two.chosen[0]!.expectedBytes).toBe(two.relayedBytes);
  });

  test("with --replicas 2 each page needs two relays with room: a big relay beside a small one holds no more than the small", () => {
    const plan = planRelays(
      input({
        vms: [{ name: "a", ramBytes: 8 * GiB, balloonedBytes: 0 }],
        sourceRate: GiB,
        destinationRate: 100 * MiB,
        replicas: 2,
        candidates: [
          { address: "big:1", free: 16 * GiB, rate: GiB },
          { address: "small:1", free: GiB, rate: GiB },
        ],
      }),
    );
    expect(plan.shortfall?.kind).toBe("relay-memory");
    expect(plan.shortfall?.message).toMatch(/^the relays can hold 1\.0 GiB of the /);
    // no relay is expected to hold more than one copy of what is relayed
    for (const r of plan.chosen) expect(r.expectedBytes).toBeLessThanOrEqual(plan.relayedBytes);
  });

  test("relays with room fewer than --replicas are a memory shortfall when relays are needed", () => {
    const plan = planRelays(
      input({
        replicas: 2,
        candidates: [{ address: "a:1", free: 16 * GiB, rate: GiB }],
        full: [{ address: "b:1", reason: "it has no room for this run (0 B free)" }],
      }),
    );
    expect(plan.shortfall).toEqual({ kind: "relay-memory", message: "only 1 of 2 relays have room for this run, fewer than --replicas 2" });
  });

  test("fewer reachable relays than --replicas is a no-relay shortfall, whatever the rates", () => {
    const plan = planRelays(input({ destinationRate: GiB, unreachable: [{ address: "gone:1", reason: "connection refused" }] }));
    expect(plan.shortfall).toEqual({ kind: "no-relay", message: "only 0 of 1 relays reachable, fewer than --replicas 1" });
    expect(plan.leftOut).toEqual([{ address: "gone:1", reason: "connection refused" }]);
  });

  test("relays that answer with no room are a memory shortfall, not a missing relay", () => {
    const plan = planRelays(input({ full: [{ address: "r:1", reason: "it has no room for this run (0 B free)" }] }));
    expect(plan.shortfall?.kind).toBe("relay-memory");
    expect(plan.shortfall?.message).toBe("1 of 1 relays have no room for this run; the others and the destination take 30.0 MiB/s of the source's 250.0 MiB/s");
  });

  test("--all-relays takes every candidate; ballooned memory is not counted", () => {
    const plan = planRelays(
      input({
        vms: [{ name: "a", ramBytes: GiB, balloonedBytes: GiB / 2 }],
        destinationRate: GiB,
        candidates: [
          { address: "a:1", free: GiB, rate: 100 * MiB },
          { address: "b:1", free: GiB, rate: 100 * MiB },
        ],
        useAll: true,
      }),
    );
    expect(plan.chosen.length).toBe(2);
    expect(plan.bytes).toBe(Math.round((GiB / 2) * (1 + REDIRTY_MARGIN)));
  });

  test("without relays named there is no shortfall: everything goes direct at the destination's pace", () => {
    const plan = planRelays(input({}));
    expect(plan.shortfall).toBeNull();
    expect(plan.expectedEvictionMs).toBe(Math.round((plan.bytes / (30 * MiB)) * 1000));
  });
});
