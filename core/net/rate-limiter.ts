// A token bucket over bytes: the gather's --max-rate holds everything it
// receives (from the scatter and from relays) to one rate, as a slow
// destination link would; a relay's holds what all its clients send it.

export class RateLimiter {
  readonly bytesPerSecond: number;
  private readonly burst: number;
  private tokens: number;
  private last = performance.now();
  /**
   * Set while the scatter's connection waits for this bucket: background
   * fetches from relays then leave the bandwidth to it, since the source is
   * evicted only once the gather has read what the scatter sent.
   */
  scatterWaiting = false;

  constructor(bytesPerSecond: number, burstBytes = Math.max(256 * 1024, bytesPerSecond / 20)) {
    this.bytesPerSecond = bytesPerSecond;
    this.burst = burstBytes;
    this.tokens = burstBytes;
  }

  /** Takes `bytes` (the bucket may go negative: what arrived has arrived). */
  take(bytes: number): void {
    this.refill();
    this.tokens -= bytes;
  }

  /** Milliseconds until the bucket is no longer in debt (0 if it is not). */
  waitMs(): number {
    this.refill();
    return this.tokens >= 0 ? 0 : (-this.tokens / this.bytesPerSecond) * 1000;
  }

  /** Is there room for `bytes` now? */
  has(bytes: number): boolean {
    this.refill();
    return this.tokens >= bytes;
  }

  private refill(): void {
    const now = performance.now();
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.bytesPerSecond);
    this.last = now;
  }
}
