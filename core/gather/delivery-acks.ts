// After switchover a page written to the destination is not yet a page it
// has: the bytes may sit in our buffers or the socket's when the gather
// dies, and then only what was saved (resume-state.ts) and what the relays
// still hold can bring it back. So a page written keeps its content (its
// need: local bytes, relay holds) until the destination confirms it: a PING
// goes behind each batch of pages, and QEMU's load thread answers it with a
// PONG only after loading everything before it.

/** PING values from here on confirm pages; lower ones mean something else (postcopy-writer.ts). */
export const FIRST_ACK_PING = 0x1000;
/** Pages per PING: one 9-byte command per 256 KiB of pages. */
const BATCH = 64;

export class DeliveryAcks {
  private batch: number[] = [];
  private readonly sent = new Map<number, number[]>();
  private next = FIRST_ACK_PING;
  private readonly ping: (value: number) => void;
  private readonly confirmed: (page: number) => void;

  /** `ping` writes a PING into the stream; `confirmed` lets a page go. */
  constructor(ping: (value: number) => void, confirmed: (page: number) => void) {
    this.ping = ping;
    this.confirmed = confirmed;
  }

  /** Page i was written to the stream. */
  written(i: number): void {
    this.batch.push(i);
    if (this.batch.length >= BATCH) this.mark();
  }

  /** A PING behind the pages written since the last one (call before a flush that may be the last for a while). */
  mark(): void {
    if (this.batch.length === 0) return;
    const value = this.next++;
    this.sent.set(value, this.batch);
    this.batch = [];
    this.ping(value);
  }

  /** A PONG came: true if it was one of ours, and every batch up to it is confirmed. */
  pong(value: number): boolean {
    if (value < FIRST_ACK_PING) return false;
    for (const [v, pages] of this.sent) {
      if (v > value) break;
      this.sent.delete(v);
      for (const i of pages) this.confirmed(i);
    }
    return true;
  }

  /** The migration completed: every page written is at the destination. */
  confirmAll(): void {
    const last = this.batch;
    this.batch = [];
    this.pong(this.next);
    for (const i of last) this.confirmed(i);
  }

  /** Pages written and not confirmed. */
  get unconfirmed(): number {
    let n = this.batch.length;
    for (const pages of this.sent.values()) n += pages.length;
    return n;
  }
}
