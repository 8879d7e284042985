// Rendezvous placement of pages on relays.

import { describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { rankRelays, relaySalt } from "../core/placement/rendezvous.ts";

const digest = (n: number) => new Uint8Array(createHash("sha256").update(`page ${n}`).digest());
const salts = ["10.0.0.1:7701", "10.0.0.2:7701", "10.0.0.3:7701", "10.0.0.4:7701"].map(relaySalt);

describe("rankRelays", () => {
  test("spreads pages evenly over relays", () => {
    const counts = [0, 0, 0, 0];
    const out: number[] = [];
    for (let n = 0; n < 40_000; n++) {
      rankRelays(digest(n), 0, salts, () => true, 1, out);
      counts[out[0]!]!++;
    }
    for (const c of counts) expect(Math.abs(c - 10_000)).toBeLessThan(600);
  });

  test("replicas are distinct relays, best first, and the best is the single choice", () => {
    const top: number[] = [];
    const one: number[] = [];
    for (let n = 0; n < 1000; n++) {
      expect(rankRelays(digest(n), 0, salts, () => true, 3, top)).toBe(3);
      expect(new Set(top.slice(0, 3)).size).toBe(3);
      rankRelays(digest(n), 0, salts, () => true, 1, one);
      expect(one[0]).toBe(top[0]!);
    }
  });

  test("taking a relay out moves only its pages", () => {
    const out: number[] = [];
    let moved = 0;
    for (let n = 0; n < 10_000; n++) {
      rankRelays(digest(n), 0, salts, () => true, 1, out);
      const before = out[0]!;
      rankRelays(digest(n), 0, salts, (r) => r !== 2, 1, out);
      if (before !== 2) expect(out[0]).toBe(before);
      else moved++;
    }
    expect(moved).toBeGreaterThan(2000);
  });

  test("fewer eligible relays than asked for", () => {
    const out: number[] = [];
    expect(rankRelays(digest(1), 0, salts, (r) => r === 1, 2, out)).toBe(1);
    expect(out[0]).toBe(1);
    expect(rankRelays(digest(1), 0, salts, () => false, 2, out)).toBe(0);
  });

  test("reads the digest at an offset", () => {
    const d = digest(7);
    const padded = new Uint8Array(40);
    padded.set(d, 8);
    const a: number[] = [];
    const b: number[] = [];
    rankRelays(d, 0, salts, () => true, 2, a);
    rankRelays(padded, 8, salts, () => true, 2, b);
    expect(b.slice(0, 2)).toEqual(a.slice(0, 2));
  });
});

describe("rankRelays with weights", () => {
  const weights = [1, 2, 1, 4];
  test("each relay's share of pages is its share of the weight, within 5%", () => {
    const counts = [0, 0, 0, 0];
    const out: number[] = [];
    for (let n = 0; n < 40_000; n++) {
      rankRelays(digest(n), 0, salts, () => true, 1, out, weights);
      counts[out[0]!]!++;
    }
    counts.forEach((c, r) => expect(Math.abs(c / 40_000 - weights[r]! / 8)).toBeLessThan(0.05 * (weights[r]! / 8)));
  });

  test("replicas are distinct relays, and a relay taken out moves only its pages", () => {
    const top: number[] = [];
    const out: number[] = [];
    for (let n = 0; n < 5000; n++) {
      expect(rankRelays(digest(n), 0, salts, () => true, 2, top, weights)).toBe(2);
      expect(top[0]).not.toBe(top[1]);
      rankRelays(digest(n), 0, salts, (r) => r !== 3, 1, out, weights);
      if (top[0] !== 3) expect(out[0]).toBe(top[0]!);
    }
  });
});
