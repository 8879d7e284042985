import { describe, expect, test } from "bun:test";
import { PageWaits } from "../core/gather/page-waits.ts";

describe("PageWaits", () => {
  test("pages wake once, on the content they wait for now", () => {
    const w = new PageWaits(8);
    w.park(1, 5);
    w.park(2, 5);
    w.park(3, 7);
    w.park(2, 7); // page 2 now waits on 7 only
    expect(w.count).toBe(3);
    const woke: number[] = [];
    w.wake(5, (p) => woke.push(p));
    expect(woke).toEqual([1]);
    w.wake(5, (p) => woke.push(p));
    expect(woke).toEqual([1]);
    w.wake(7, (p) => woke.push(p));
    expect(woke.sort()).toEqual([1, 2, 3]);
    expect(w.count).toBe(0);
  });

  test("unparking from the middle of a list keeps the rest; content ids past the first table grow it", () => {
    const w = new PageWaits(16);
    for (let p = 0; p < 6; p++) w.park(p, 5000);
    w.unpark(3);
    w.unpark(0);
    w.unpark(5);
    w.unpark(5);
    expect(w.count).toBe(3);
    expect(w.isWaiting(3)).toBe(false);
    const woke: number[] = [];
    w.wake(5000, (p) => woke.push(p));
    expect(woke.sort()).toEqual([1, 2, 4]);
  });

  test("a page woken may park again at once, on other content", () => {
    const w = new PageWaits(4);
    w.park(0, 1);
    w.park(1, 1);
    w.wake(1, (p) => w.park(p, 2));
    expect(w.count).toBe(2);
    w.clear();
    expect(w.count).toBe(0);
    const woke: number[] = [];
    w.wake(2, (p) => woke.push(p));
    expect(woke).toEqual([]);
  });
});
