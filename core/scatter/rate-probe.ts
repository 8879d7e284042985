// Measures how fast a relay or the gather takes bytes from this host: a
// short timed transfer of filler, a window of it in flight, each chunk
// acknowledged once the peer has read it (through its own rate limit). Run
// against several peers at once, the sum is what the source sends them
// together.

import { SgmError } from "../errors.ts";
import type { PeerConnection } from "../wire/connection.ts";
import { PROBE_CHUNK, ProbeFrame, probeHeader, readProbeAck } from "../wire/probe-frames.ts";
import { exchange } from "./exchange.ts";

/**
 * Long enough for a shaped link's rate to show; short, since a probe takes
 * the source's link from the eviction. On the bench's bed, one VM with 3
 * relays sent 241 MiB over the source's link with 100 ms probes, a 4 MiB
 * window and a measured source rate; 178 MiB with these and --source-rate.
 */
export const PROBE_MS = 50;
/** Bytes a probe frame carries: small beside the window, so the first frame, read before any limit shows, is a small part. */
const CHUNK_BYTES = PROBE_CHUNK / 4;
/** Unacknowledged probe bytes: past a shaped link's burst, enough for a fast link's round trip. */
const WINDOW_BYTES = 2 * PROBE_CHUNK;
/** A peer that has not taken the window this long after the probe's end is dropped: slower than 70 KiB/s. */
const DRAIN_TIMEOUT_MS = 30_000;

const filler = new Uint8Array(CHUNK_BYTES - 4);

/**
 * Bytes a second the peer took during a probe of about durationMs. A peer
 * that does not take it in time has its connection aborted, so that no late
 * acknowledgement reaches whoever reads the connection next.
 */
export function probeRate(conn: PeerConnection, label: string, durationMs = PROBE_MS, signal?: AbortSignal): Promise<number> {
  const timedOut = () => new SgmError("unavailable", `${label} took no more of the rate probe for ${DRAIN_TIMEOUT_MS / 1000} s`);
  const options = { who: label, timeoutMs: durationMs + DRAIN_TIMEOUT_MS, timedOut, closedSuffix: " during the rate probe", signal };
  return exchange<number>(conn, options, (settle) => {
    const start = performance.now();
    let next = 0;
    let inFlight = 0;
    // from the first acknowledgement on: the first chunk is read at once, before any rate limit can show
    let firstAckAt = 0;
    let acked = 0;
    let lastAckAt = start;
    const pump = (): void => {
      while (performance.now() - start < durationMs && inFlight + CHUNK_BYTES <= WINDOW_BYTES) {
        conn.sendParts(ProbeFrame.PROBE, [probeHeader(next++), filler]);
        inFlight += CHUNK_BYTES;
      }
      if (inFlight === 0) settle.resolve((acked * 1000) / Math.max(1, lastAckAt - firstAckAt));
    };
    conn.onFrame((type, payload) => {
      if (type !== ProbeFrame.PROBE_ACK) throw new SgmError("data", `${label} answered the rate probe with frame type ${type}`);
      const ack = readProbeAck(payload);
      if (ack.bytes !== CHUNK_BYTES) throw new SgmError("data", `${label} acknowledged ${ack.bytes} probe bytes, not ${CHUNK_BYTES}`);
      inFlight -= ack.bytes;
      lastAckAt = performance.now();
      if (firstAckAt === 0) firstAckAt = lastAckAt;
      else acked += ack.bytes;
      pump();
    });
    pump();
  });
}
