// Every page content the gather knows of, by digest: its bytes held here
// (in the page store) and/or on relays (a bit per relay of the run).
//
// Content stays known while the scatter may still name it (a pin: it sent
// the bytes here, or told where relays hold them) or a page still owes it
// to the destination (a need). Its bytes stay here only while a page needs
// them, or while they are pinned and no relay holds them; otherwise they can
// be fetched again. So what the gather holds is bounded by what the scatter
// keeps pinned here (it unpins as it goes) and by what pages owe the
// destination, not by the VM's size.
//
// The two are counted apart: bytes owed drain to the destination whatever
// the scatter does, so the gather may stop reading the scatter until they
// do; bytes held only for a pin go when an UNPIN arrives from the scatter,
// so waiting for those with the scatter unread would wait for ever.
//
// Content ids are never reused within a run, so an id names one content for
// good: page tables compare ids, and the final page map is read off them.

import { PAGE_BYTES } from "../dedup/digest.ts";
import { DigestIndex } from "../dedup/digest-index.ts";
import { PageSlots } from "../dedup/page-slots.ts";
import { SgmError } from "../errors.ts";
import { grown, grownSize } from "../typed-arrays.ts";

/** Content no longer known: the relays holding it may drop it (its digest stays readable: digestOf). */
export type Forgotten = (cid: number, relayMask: number) => void;

const NO_BYTES = -1;

export class ContentDirectory {
  private readonly index = new DigestIndex(0, { reuseIds: false });
  private readonly store = new PageSlots();
  private storeId = new Int32Array(1024).fill(NO_BYTES);
  private relays = new Uint32Array(1024);
  /**
   * Bit 1: the scatter sent the bytes here; bit 2: it told where relays
   * hold them; bit 4: a failed VM that ran at its destination may need it
   * from relays (retain), so it is never released while this gather runs.
   */
  private pins = new Uint8Array(1024);
  private needs = new Int32Array(1024);
  private readonly localListeners: Array<(cid: number) => void> = [];
  private readonly forgotten: Forgotten;
  private readonly owedWaiters: Array<{ below: number; wake: () => void }> = [];
  /** Local contents a page still owes the destination. */
  private owed = 0;
  /** Content ever made local here, received or fetched. */
  localPages = 0;
  /** The most page bytes held here at once. */
  peakBytes = 0;

  constructor(forgotten: Forgotten) {
    this.forgotten = forgotten;
  }

  /** The id of the content with this digest (new if not known). */
  intern(digest: Uint8Array, at: number): number {
    // insert finds a known digest too: one probe, not a lookup and then another
    const size = this.index.size;
    const cid = this.index.insert(digest, at);
    if (this.index.size > size) this.grow(cid);
    return cid;
  }

  lookup(digest: Uint8Array, at: number): number {
    return this.index.lookup(digest, at);
  }

  /** The content's digest (a view, good until the next intern), known or not any more. */
  digestOf(cid: number): Uint8Array {
    return this.index.digestEverHeld(cid);
  }

  /** Copies the content's digest to out[at .. at + 32), known or not any more. */
  copyDigest(cid: number, out: Uint8Array, at: number): void {
    this.index.copyDigestEverHeld(cid, out, at);
  }

  isLocal(cid: number): boolean {
    return this.storeId[cid]! !== NO_BYTES;
  }

  relayMask(cid: number): number {
    return this.relays[cid]!;
  }

  /** The content's bytes, as a view; only for local content. */
  data(cid: number): Uint8Array {
    return this.store.view(this.localId(cid));
  }

  /** The memory local content lies in, at offsetOf(cid): for copying it out without a view. */
  slabOf(cid: number): Uint8Array {
    return this.store.slabOf(this.localId(cid));
  }

  offsetOf(cid: number): number {
    return this.store.offsetOf(this.localId(cid));
  }

  private localId(cid: number): number {
    const id = this.storeId[cid]!;
    if (id === NO_BYTES) throw new SgmError("internal", "content asked for before it arrived");
    return id;
  }

  /** The scatter sent these bytes, bytes[at .. at + 4096) (verified against the digest): it may name them from now on. */
  receive(cid: number, bytes: Uint8Array, at = 0): void {
    this.pins[cid]! |= 1;
    this.keep(cid, bytes, at);
  }

  /** Relays (a bit each) went: they hold nothing any more, and no fetch is to count on them. */
  forgetRelays(mask: number): void {
    for (let cid = 0; cid < this.relays.length; cid++) this.relays[cid]! &= ~mask;
  }

  /** The scatter says relays hold this content: it may name it from now on. */
  locate(cid: number, mask: number): void {
    this.pins[cid]! |= 2;
    this.relays[cid]! |= mask;
  }

  /** A resumed gather's saved content: these relays hold it; no scatter pins it. */
  restore(cid: number, mask: number): void {
    this.relays[cid]! |= mask;
  }

  /** After a restore: lets go of what no page needs. */
  settleAll(): void {
    for (let cid = 0; cid < this.needs.length; cid++) if (this.index.has(cid)) this.settle(cid);
  }

  /** Bytes fetched from a relay, bytes[at .. at + 4096) (verified): kept if a page still needs them. */
  fetched(cid: number, bytes: Uint8Array, at = 0): void {
    if (this.needs[cid]! > 0) this.keep(cid, bytes, at);
  }

  /** The scatter will not name content it sent here unless it sends it again. */
  unpin(cid: number): void {
    this.pins[cid]! &= ~1;
    this.settle(cid);
  }

  /** The scatter is gone: it names nothing more. */
  unpinAll(): void {
    for (let cid = 0; cid < this.pins.length; cid++) {
      if ((this.pins[cid]! & 3) === 0) continue;
      this.pins[cid]! &= ~3;
      this.settle(cid);
    }
  }

  /** Keeps the content known, and so held on its relays, for as long as this gather runs; its bytes here may go. */
  retain(cid: number): void {
    this.pins[cid]! |= 4;
  }

  /** A page owes this content to the destination. */
  need(cid: number): void {
    if (this.needs[cid]!++ === 0 && this.isLocal(cid)) this.owed++;
  }

  /** A page no longer owes it (written, or changed). */
  unneed(cid: number): void {
    const left = --this.needs[cid]!;
    if (left < 0) throw new SgmError("internal", `content ${cid} needed fewer than zero times`);
    if (left === 0 && this.isLocal(cid)) {
      this.owed--;
      this.wakeOwedWaiters();
    }
    this.settle(cid);
  }

  /** Calls `listener` with every content id whose bytes arrive here from now on. */
  onLocal(listener: (cid: number) => void): void {
    this.localListeners.push(listener);
  }

  /** Resolves once the bytes owed to destinations are below `bytes` (see the top of this file). */
  whenOwedBelow(bytes: number): Promise<void> {
    if (this.owedBytes < bytes) return Promise.resolve();
    return new Promise((wake) => this.owedWaiters.push({ below: bytes, wake }));
  }

  /** Bytes held here that a page still owes a destination. */
  get owedBytes(): number {
    return this.owed * PAGE_BYTES;
  }

  /** Bytes held here: owed, or kept for the scatter's pins. */
  get usedBytes(): number {
    return this.store.usedBytes;
  }

  private keep(cid: number, bytes: Uint8Array, at: number): void {
    if (this.storeId[cid] !== NO_BYTES) return;
    this.storeId[cid] = this.store.put(bytes, at);
    if (this.needs[cid]! > 0) this.owed++;
    this.localPages++;
    if (this.store.usedBytes > this.peakBytes) this.peakBytes = this.store.usedBytes;
    for (const listener of this.localListeners) listener(cid);
  }

  /** Drops what is not needed any more: the bytes, or the content altogether. */
  private settle(cid: number): void {
    if (this.needs[cid]! > 0) return;
    const pins = this.pins[cid]!;
    const id = this.storeId[cid]!;
    // bytes the scatter pinned must stay: it counts them as held here
    // (relays holding them too may go), and names them without sending again
    if (id !== NO_BYTES && !(pins & 1)) {
      this.store.freeSlot(id);
      this.storeId[cid] = NO_BYTES;
    }
    if (pins !== 0 || !this.index.has(cid)) return;
    this.forgotten(cid, this.relays[cid]!);
    this.index.remove(cid);
  }

  private wakeOwedWaiters(): void {
    for (let k = this.owedWaiters.length - 1; k >= 0; k--) {
      const w = this.owedWaiters[k]!;
      if (this.owedBytes >= w.below) continue;
      this.owedWaiters.splice(k, 1);
      w.wake();
    }
  }

  private grow(cid: number): void {
    if (cid < this.needs.length) return;
    const size = grownSize(cid, this.needs.length);
    this.storeId = grown(this.storeId, size, NO_BYTES);
    this.relays = grown(this.relays, size);
    this.pins = grown(this.pins, size);
    this.needs = grown(this.needs, size);
  }
}
