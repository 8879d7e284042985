// One request-and-answer on a peer connection before any page moves (a
// question to a relay or the gather, a rate probe): it takes the
// connection's frame handler until it settles, and ends by its deadline,
// by the caller's signal or by the connection closing. A failure aborts the
// connection, so that an answer arriving later cannot reach whoever reads
// the connection next.

import { SgmError } from "../errors.ts";
import type { PeerConnection } from "../wire/connection.ts";

export interface ExchangeOptions {
  /** Who answers, for messages: "relay HOST:PORT", "the gather". */
  who: string;
  timeoutMs: number;
  /** Why the exchange failed when the deadline passed. */
  timedOut: () => SgmError;
  /** Said after "who: reason" when the connection closes first. */
  closedSuffix?: string;
  signal?: AbortSignal;
}

export interface Settle<T> {
  resolve(value: T): void;
  fail(err: unknown): void;
}

/** Runs `start` (which sets the frame handler and sends) and settles once. */
export function exchange<T>(conn: PeerConnection, options: ExchangeOptions, start: (settle: Settle<T>) => void): Promise<T> {
  return new Promise((resolve, reject) => {
    const { signal } = options;
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const done = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    };
    const fail = (err: unknown): void => {
      done();
      conn.abort(err instanceof Error ? err : undefined);
      reject(err);
    };
    const onAbort = (): void => fail(signal?.reason);
    signal?.addEventListener("abort", onAbort);
    const timer = setTimeout(() => fail(options.timedOut()), options.timeoutMs);
    void conn.closed.then((reason) => {
      done();
      reject(new SgmError("unavailable", `${options.who}: ${reason?.message ?? "connection closed"}${options.closedSuffix ?? ""}`));
    });
    start({
      resolve: (value) => {
        done();
        resolve(value);
      },
      fail,
    });
  });
}
