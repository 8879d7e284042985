// Which scatter run holds which pages on a relay, and for how long.
//
// Each (run, digest) hold is one reference in the PageStore, so a page
// shared by several runs stays until the last of them lets go, and a run
// that puts the same content twice still holds it once: one RELEASE from
// the gather then frees it.
//
// A run lives while it holds pages and has been active within the TTL: PUT,
// HOLD and RELEASE refresh it (GET and HAS name it too, but reading is not
// holding on). A gather that fetches a run's pages releases them as it
// goes, and one that must wait without releasing sends a RELEASE of no
// digests to keep the run alive.
//
// A run may also reserve room before it puts anything, so that several
// scatters sharing a relay do not overcommit it: what a run has reserved
// and not yet filled is set aside from every other run's room. Pages held
// by several runs count in each one's fill, which can only make the set
// aside smaller than it should be, never the store larger than its capacity.
//
// A keeper (an evacuation, for its runs to other destinations) keeps pages
// while room allows: its pages stay as spare when no run holds them, count
// as free room, and give up their slots to new pages. A keeper lives while
// it keeps pages and has kept, or had a run hold from it, within the TTL;
// it is no run (a draining relay does not wait for it, and drops what it
// keeps). A relay keeps for at most MAX_KEEPERS at once: each costs a
// bitmap, and a peer with the key could otherwise name keepers without end.

import { DIGEST_BYTES, PAGE_BYTES } from "../dedup/digest.ts";
import type { PageStore } from "../dedup/page-store.ts";
import { IdSet } from "../dedup/id-set.ts";

interface Run {
  /** PageStore ids held, one reference each; an id stays valid while we hold it. */
  readonly ids: IdSet;
  deadline: number;
  /** Bytes of pages the run expects to hold, counting those it does; 0 for none. */
  reserved: number;
}

export interface ExpiredRun {
  run: string;
  pages: number;
  /** A keeper's kept pages, not a run's holds. */
  keeper: boolean;
}

export const MAX_KEEPERS = 256;

export class RunHolds {
  private readonly store: PageStore;
  private readonly ttlMs: number;
  private readonly runs = new Map<string, Run>();
  private readonly keepers = new Map<string, { ids: IdSet; deadline: number }>();
  /** Draining: runs it does not hold yet are refused, those it holds go on. */
  private closedToNewRuns = false;

  constructor(store: PageStore, ttlMs: number) {
    this.store = store;
    this.ttlMs = ttlMs;
  }

  /** Runs holding at least one page or a reservation. */
  get runCount(): number {
    return this.runs.size;
  }

  /** From now on a run it holds nothing for gets no room: no page, no reservation, and no keeper keeps anything. */
  closeToNewRuns(): void {
    this.closedToNewRuns = true;
    for (const keeper of [...this.keepers.keys()]) this.unkeepAll(keeper);
  }


  /** Bytes reserved by every run and not yet filled. */
  get outstandingBytes(): number {
    return this.outstandingExcept(null);
  }

  /** What `run` may still fill: the store's free room less what other runs have reserved and not filled. */
  roomFor(run: string | null): number {
    if (this.closedToNewRuns && (run === null || !this.runs.has(run))) return 0;
    return Math.max(0, this.roomBeside(this.outstandingExcept(run)));
  }

  /** The store's free room (spare pages count as free) less `setAside` bytes other runs reserved and did not fill; may be negative. */
  private roomBeside(setAside: number): number {
    return this.store.capacityBytes - this.store.usedBytes + this.store.spareBytes - setAside;
  }

  /**
   * Sets the run's reservation to `bytes`, or to as much of it as its held
   * pages and its room allow; returns what was reserved.
   */
  reserve(run: string, bytes: number, now: number): number {
    let entry = this.runs.get(run);
    if (!entry) {
      if (bytes <= 0 || this.closedToNewRuns) return 0;
      entry = { ids: new IdSet(), deadline: 0, reserved: 0 };
      this.runs.set(run, entry);
    }
    entry.deadline = now + this.ttlMs;
    entry.reserved = Math.max(0, Math.min(bytes, entry.ids.size * PAGE_BYTES + this.roomFor(run)));
    this.dropIfEmpty(run, entry);
    return entry.reserved;
  }

  /**
   * Holds for `run` each of the `count` pages of a PUT (page n is 4096
   * bytes of `pages` from pageAt(n), its digest at digestAt(n)); refused[n]
   * says the store is full and does not have it. A page the run holds
   * already, or the store has, is held without room. The run and the room
   * other runs set aside are looked up once a PUT, not once a page: no
   * other run's holds change meanwhile.
   */
  holdPut(
    run: string,
    count: number,
    digests: Uint8Array,
    digestAt: (n: number) => number,
    pages: Uint8Array,
    pageAt: (n: number) => number,
    now: number,
  ): boolean[] {
    const refused = new Array<boolean>(count).fill(false);
    let entry = this.runs.get(run);
    if (entry) entry.deadline = now + this.ttlMs;
    else if (this.closedToNewRuns) return refused.fill(true);
    const store = this.store;
    const others = this.outstandingExcept(run);
    for (let n = 0; n < count; n++) {
      const id = store.idOf(digests, digestAt(n));
      if (id !== -1 && entry?.ids.has(id)) continue;
      // content the store has already takes no room; new content must fit beside other runs' reservations
      if (id === -1) {
        if (this.roomBeside(others) < PAGE_BYTES) {
          refused[n] = true;
          continue;
        }
        if (store.full) this.evictSpare();
      }
      const put = store.put(digests, digestAt(n), pages, pageAt(n));
      if (put === null) {
        refused[n] = true;
        continue;
      }
      if (!entry) {
        entry = { ids: new IdSet(), deadline: now + this.ttlMs, reserved: 0 };
        this.runs.set(run, entry);
      }
      entry.ids.add(put.id);
    }
    return refused;
  }

  /** The run holds page `id`: it may read it. */
  holds(run: string, id: number): boolean {
    return this.runs.get(run)?.ids.has(id) ?? false;
  }

  /**
   * Holds for `run` a page `keeper` keeps (another run of its evacuation
   * put it), without its bytes: true if the run now holds it, false if the
   * keeper does not keep it (then the run must put it). Knowing a digest
   * is not enough: the keeper's id is the evacuation's secret.
   */
  holdHeld(run: string, keeper: string, digest: Uint8Array, digestAt: number, now: number): boolean {
    const id = this.store.idOf(digest, digestAt);
    const kept = this.keepers.get(keeper);
    if (id === -1 || !kept?.ids.has(id)) return false;
    // what an evacuation's later runs hold from it keeps it alive, as its keeping does
    kept.deadline = now + this.ttlMs;
    let entry = this.runs.get(run);
    if (entry) {
      entry.deadline = now + this.ttlMs;
      if (entry.ids.has(id)) return true;
    } else {
      if (this.closedToNewRuns) return false;
      entry = { ids: new IdSet(), deadline: now + this.ttlMs, reserved: 0 };
      this.runs.set(run, entry);
    }
    this.store.retain(id);
    entry.ids.add(id);
    return true;
  }

  /**
   * Drops the run's holds on `count` digests at digests[0 ..). Digests or
   * runs it does not know are skipped, so a repeated RELEASE is harmless.
   * Returns how many holds were dropped.
   */
  release(run: string, digests: Uint8Array, count: number, now: number): number {
    const entry = this.runs.get(run);
    if (!entry) return 0;
    entry.deadline = now + this.ttlMs;
    let dropped = 0;
    for (let n = 0; n < count; n++) {
      const id = this.store.idOf(digests, n * DIGEST_BYTES);
      if (id !== -1 && entry.ids.delete(id)) {
        this.store.release(id);
        dropped++;
      }
    }
    this.dropIfEmpty(run, entry);
    return dropped;
  }

  /** Keeps for `keeper` the page with this digest, if `run` holds it: true if kept. */
  keep(keeper: string, run: string, digest: Uint8Array, digestAt: number, now: number): boolean {
    const id = this.store.idOf(digest, digestAt);
    if (id === -1 || this.closedToNewRuns || !this.holds(run, id)) return false;
    let entry = this.keepers.get(keeper);
    if (!entry) {
      if (this.keepers.size >= MAX_KEEPERS) return false;
      entry = { ids: new IdSet(), deadline: 0 };
      this.keepers.set(keeper, entry);
    }
    entry.deadline = now + this.ttlMs;
    if (entry.ids.add(id)) this.store.keep(id);
    return true;
  }

  /** Drops everything `keeper` keeps; returns how many pages it kept. */
  unkeepAll(keeper: string): number {
    const entry = this.keepers.get(keeper);
    if (!entry) return 0;
    this.keepers.delete(keeper);
    for (const id of entry.ids) this.store.unkeep(id);
    return entry.ids.size;
  }

  /** Drops every hold of the runs, and everything the keepers keep, whose deadline has passed. */
  expire(now: number): ExpiredRun[] {
    const expired: ExpiredRun[] = [];
    for (const [keeper, entry] of this.keepers) {
      if (entry.deadline <= now) expired.push({ run: keeper, pages: this.unkeepAll(keeper), keeper: true });
    }
    for (const [run, entry] of this.runs) {
      if (entry.deadline > now) continue;
      for (const id of entry.ids) this.store.release(id);
      this.runs.delete(run);
      expired.push({ run, pages: entry.ids.size, keeper: false });
    }
    return expired;
  }

  /** Frees one spare page's slot, and forgets it in the keeper that kept it. */
  private evictSpare(): void {
    const id = this.store.evictSpare();
    if (id === -1) return;
    for (const entry of this.keepers.values()) entry.ids.delete(id);
  }

  private outstandingExcept(run: string | null): number {
    let outstanding = 0;
    for (const [key, entry] of this.runs) {
      if (key !== run) outstanding += Math.max(0, entry.reserved - entry.ids.size * PAGE_BYTES);
    }
    return outstanding;
  }

  private dropIfEmpty(run: string, entry: Run): void {
    if (entry.ids.size === 0 && entry.reserved === 0) this.runs.delete(run);
  }
}
