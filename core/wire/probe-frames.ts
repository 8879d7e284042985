// A timed transfer that measures how fast a peer takes bytes: the scatter
// sends PROBE frames of filler, the relay or gather answers each with a
// PROBE_ACK once it has read it (through its own rate limit, if it has one).
//
// PROBE     req(u32) filler
// PROBE_ACK req(u32) bytes(u32)

import { SgmError } from "../errors.ts";

export const ProbeFrame = {
  PROBE: 29,
  PROBE_ACK: 30,
} as const;

export const PROBE_CHUNK = 1 << 20;

export function probeMaxPayload(type: number): number | undefined {
  if (type === ProbeFrame.PROBE) return 4 + PROBE_CHUNK;
  if (type === ProbeFrame.PROBE_ACK) return 8;
  return undefined;
}

/** The PROBE_ACK that answers a PROBE payload. */
export function encodeProbeAck(probe: Uint8Array): Uint8Array {
  if (probe.length < 4) throw new SgmError("data", `PROBE of ${probe.length} bytes`);
  const ack = new Uint8Array(8);
  const view = new DataView(ack.buffer);
  view.setUint32(0, new DataView(probe.buffer, probe.byteOffset, 4).getUint32(0));
  view.setUint32(4, probe.length);
  return ack;
}

export function readProbeAck(payload: Uint8Array): { req: number; bytes: number } {
  if (payload.length !== 8) throw new SgmError("data", `PROBE_ACK of ${payload.length} bytes`);
  const view = new DataView(payload.buffer, payload.byteOffset, 8);
  return { req: view.getUint32(0), bytes: view.getUint32(4) };
}

/** The first part of a PROBE numbered `req`; the filler that follows is any bytes, shared by every probe. */
export function probeHeader(req: number): Uint8Array {
  const header = new Uint8Array(4);
  new DataView(header.buffer).setUint32(0, req);
  return header;
}
