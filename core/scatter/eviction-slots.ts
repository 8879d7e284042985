// How many VMs of a host migrate at once (`evacuate --max-in-flight`), and
// which goes next: the largest waiting, since it takes longest and the host
// is free only when the last VM is off it. Nothing is granted until the
// gate opens, once every run ready to plan has planned and queued its VMs:
// otherwise the first run to plan would take the slots whatever the size of
// the others. A run that comes later queues its VMs behind those granted.

import { SgmError } from "../errors.ts";

interface Waiter {
  bytes: number;
  /** Ties go in the order VMs were queued. */
  order: number;
  grant: (release: () => void) => void;
}

export class EvictionSlots {
  private free: number;
  private opened = false;
  private queued = 0;
  private readonly waiting: Waiter[] = [];

  constructor(limit: number) {
    if (!Number.isInteger(limit) || limit < 1) throw new SgmError("internal", `eviction slots: limit ${limit}`);
    this.free = limit;
  }

  /** Resolves with a release function once this VM of `bytes` may migrate; rejects if `signal` aborts first. */
  acquire(bytes: number, signal?: AbortSignal): Promise<() => void> {
    signal?.throwIfAborted();
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        const at = this.waiting.indexOf(waiter);
        if (at >= 0) this.waiting.splice(at, 1);
        reject(signal!.reason);
      };
      const waiter: Waiter = {
        bytes,
        order: this.queued++,
        grant: (release) => {
          signal?.removeEventListener("abort", onAbort);
          resolve(release);
        },
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.waiting.push(waiter);
      this.grantWhatIsFree();
    });
  }

  /** From now on, slots are granted. */
  open(): void {
    this.opened = true;
    this.grantWhatIsFree();
  }

  private grantWhatIsFree(): void {
    if (!this.opened) return;
    while (this.free > 0 && this.waiting.length > 0) {
      let best = 0;
      for (let i = 1; i < this.waiting.length; i++) {
        const w = this.waiting[i]!;
        const b = this.waiting[best]!;
        if (w.bytes > b.bytes || (w.bytes === b.bytes && w.order < b.order)) best = i;
      }
      const [next] = this.waiting.splice(best, 1);
      this.free--;
      let released = false;
      next!.grant(() => {
        if (released) return;
        released = true;
        this.free++;
        this.grantWhatIsFree();
      });
    }
  }
}
