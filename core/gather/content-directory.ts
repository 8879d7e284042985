// Every page content the gather knows of, by digest: held here (in the page
// store) and/or on relays (a bit per relay of the run). References come from
// VMs' page tables and from the scatter while it may still name the content;
// when the last goes, the local copy is dropped and the relays are told.
//
// Content ids are never reused within a run, so an id names one content for
// good: page tables compare ids, and the final page map is read off them.

import { DIGEST_BYTES } from "../dedup/digest.ts";
import { DigestIndex } from "../dedup/digest-index.ts";
import { PageStore } from "../dedup/page-store.ts";
import { SgmError } from "../errors.ts";

/** Content no longer referenced: its id is gone (and may be reused). */
export type Unreferenced = (cid: number, digest: Uint8Array, relayMask: number) => void;

export class ContentDirectory {
  private readonly index = new DigestIndex(0, { reuseIds: false });
  private readonly store = new PageStore();
  private storeId = new Int32Array(1024).fill(-1);
  private relays = new Uint32Array(1024);
  private refs = new Int32Array(1024);
  private readonly waiters = new Map<number, Array<() => void>>();
  private readonly unreferenced: Unreferenced;
  /** Content ever made local here, received or fetched. */
  localPages = 0;

  constructor(unreferenced: Unreferenced) {
    this.unreferenced = unreferenced;
  }

  /** The id of the content with this digest (new, unreferenced, if not known). */
  intern(digest: Uint8Array, at: number): number {
    const known = this.index.lookup(digest, at);
    if (known >= 0) return known;
    const cid = this.index.insert(digest, at);
    this.grow(cid);
    this.storeId[cid] = -1;
    this.relays[cid] = 0;
    this.refs[cid] = 0;
    return cid;
  }

  lookup(digest: Uint8Array, at: number): number {
    return this.index.lookup(digest, at);
  }

  /** The content's digest (a view, good until the next intern), held or not any more. */
  digestOf(cid: number): Uint8Array {
    return this.index.digestEverHeld(cid);
  }

  isLocal(cid: number): boolean {
    return this.storeId[cid]! >= 0;
  }

  relayMask(cid: number): number {
    return this.relays[cid]!;
  }

  /** The content's bytes; only for local content. */
  data(cid: number): Uint8Array {
    const id = this.storeId[cid]!;
    if (id < 0) throw new SgmError("internal", "content asked for before it arrived");
    return this.store.get(id);
  }

  addRelays(cid: number, mask: number): void {
    this.relays[cid]! |= mask;
  }

  /** Keeps a copy of `page` (already verified against the digest) and wakes whoever waits for it. */
  addLocal(cid: number, page: Uint8Array): void {
    if (this.storeId[cid]! >= 0) return;
    const digest = this.index.digestOf(cid);
    const put = this.store.put(digest, 0, page);
    if (!put) throw new SgmError("internal", "gather page store refused a page");
    this.storeId[cid] = put.id;
    this.localPages++;
    const waiting = this.waiters.get(cid);
    if (waiting) {
      this.waiters.delete(cid);
      for (const wake of waiting) wake();
    }
  }

  /** Calls `wake` once the content is local (at once if it is). */
  whenLocal(cid: number, wake: () => void): void {
    if (this.storeId[cid]! >= 0) {
      wake();
      return;
    }
    const waiting = this.waiters.get(cid);
    if (waiting) waiting.push(wake);
    else this.waiters.set(cid, [wake]);
  }

  retain(cid: number): void {
    this.refs[cid]!++;
  }

  release(cid: number): void {
    if (--this.refs[cid]! > 0) return;
    const id = this.storeId[cid]!;
    if (id >= 0) this.store.release(id);
    this.unreferenced(cid, this.index.digestOf(cid).slice(0, DIGEST_BYTES), this.relays[cid]!);
    this.waiters.delete(cid);
    this.index.remove(cid);
  }

  get usedBytes(): number {
    return this.store.usedBytes;
  }

  private grow(cid: number): void {
    if (cid < this.refs.length) return;
    const size = Math.max(cid + 1, this.refs.length * 2);
    const storeId = new Int32Array(size).fill(-1);
    storeId.set(this.storeId);
    this.storeId = storeId;
    const relays = new Uint32Array(size);
    relays.set(this.relays);
    this.relays = relays;
    const refs = new Int32Array(size);
    refs.set(this.refs);
    this.refs = refs;
  }
}
