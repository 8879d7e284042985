// evacuate's slots: at most N VMs at once, the largest waiting first, none
// before the gate opens, and a VM stopped while it waits never gets one.

import { describe, expect, test } from "bun:test";
import { EvictionSlots } from "../core/scatter/eviction-slots.ts";

/** Acquires for each size; records the order slots are granted in. */
function queue(slots: EvictionSlots, sizes: number[], signals: AbortSignal[] = []) {
  const granted: number[] = [];
  const releases = new Map<number, () => void>();
  const outcomes = sizes.map((bytes, i) =>
    slots.acquire(bytes, signals[i]).then((release) => {
      granted.push(bytes);
      releases.set(bytes, release);
    }),
  );
  return { granted, releases, outcomes };
}

const settle = () => new Promise((resolve) => setTimeout(resolve, 0));

describe("eviction slots", () => {
  test("nothing before the gate opens; then the largest first, two at a time, the next as one is released", async () => {
    const slots = new EvictionSlots(2);
    const { granted, releases } = queue(slots, [10, 30, 20, 40]);
    await settle();
    expect(granted).toEqual([]);
    slots.open();
    await settle();
    expect(granted).toEqual([40, 30]);
    releases.get(30)!();
    releases.get(30)!(); // a second release frees nothing more
    await settle();
    expect(granted).toEqual([40, 30, 20]);
    releases.get(40)!();
    await settle();
    expect(granted).toEqual([40, 30, 20, 10]);
  });

  test("equal sizes go in the order they queued; one queued after the gate opened waits its turn", async () => {
    const slots = new EvictionSlots(1);
    const a = queue(slots, [5, 5]);
    slots.open();
    await settle();
    const b = queue(slots, [100]);
    await settle();
    expect([...a.granted, ...b.granted]).toEqual([5]);
    a.releases.get(5)!();
    await settle();
    // the large one queued later goes before the second 5
    expect(b.granted).toEqual([100]);
  });

  test("a VM stopped while it waits is refused with the reason and takes no slot", async () => {
    const slots = new EvictionSlots(1);
    const stop = new AbortController();
    const { granted, outcomes } = queue(slots, [50, 10], [stop.signal]);
    stop.abort(new Error("relay lost"));
    await expect(outcomes[0]!).rejects.toThrow("relay lost");
    slots.open();
    await settle();
    expect(granted).toEqual([10]);
  });
});
