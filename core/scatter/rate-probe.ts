// Measures how fast a relay or the gather takes bytes from this host: a
// short timed transfer of filler, a window of it in flight, each chunk
// acknowledged once the peer has read it (through its own rate limit). Run
// against several peers at once, the sum is what the source sends them
// together.

import { SgmError } from "../errors.ts";
import type { PeerConnection } from "../wire/connection.ts";
import { PROBE_CHUNK, ProbeFrame, probeHeader, readProbeAck } from "../wire/probe-frames.ts";

/** Long enough for a link's queues to fill and its rate to show; short beside an eviction. */
export const PROBE_MS = 100;
/** Unacknowledged probe bytes: past a shaped link's burst, small enough to drain fast from a slow peer. */
const WINDOW_BYTES = 4 * PROBE_CHUNK;
/** A peer that has not taken the window this long after the probe's end is left out. */
const DRAIN_TIMEOUT_MS = 10_000;

const filler = new Uint8Array(PROBE_CHUNK - 4);

/** Bytes a second the peer took during a probe of about durationMs. */
export function probeRate(conn: PeerConnection, label: string, durationMs = PROBE_MS): Promise<number> {
  return new Promise((resolve, reject) => {
    const start = performance.now();
    let next = 0;
    let inFlight = 0;
    // from the first acknowledgement on: the first chunk is read at once, before any rate limit can show
    let firstAckAt = 0;
    let acked = 0;
    let lastAckAt = start;
    const timer = setTimeout(() => reject(new SgmError("unavailable", `${label} took no more of the rate probe for ${DRAIN_TIMEOUT_MS / 1000} s`)), durationMs + DRAIN_TIMEOUT_MS);
    const pump = (): void => {
      while (performance.now() - start < durationMs && inFlight + PROBE_CHUNK <= WINDOW_BYTES) {
        conn.sendParts(ProbeFrame.PROBE, [probeHeader(next++), filler]);
        inFlight += PROBE_CHUNK;
      }
      if (inFlight > 0) return;
      clearTimeout(timer);
      resolve((acked * 1000) / Math.max(1, lastAckAt - firstAckAt));
    };
    conn.onFrame((type, payload) => {
      if (type !== ProbeFrame.PROBE_ACK) throw new SgmError("data", `${label} answered the rate probe with frame type ${type}`);
      const ack = readProbeAck(payload);
      if (ack.bytes !== PROBE_CHUNK) throw new SgmError("data", `${label} acknowledged ${ack.bytes} probe bytes, not ${PROBE_CHUNK}`);
      inFlight -= ack.bytes;
      lastAckAt = performance.now();
      if (firstAckAt === 0) firstAckAt = lastAckAt;
      else acked += ack.bytes;
      pump();
    });
    void conn.closed.then((reason) => {
      clearTimeout(timer);
      reject(new SgmError("unavailable", `${label}: ${reason?.message ?? "connection closed"} during the rate probe`));
    });
    pump();
  });
}
