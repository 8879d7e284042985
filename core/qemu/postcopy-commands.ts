// The commands a postcopy source sends at its switch, as scatter reads them:
// POSTCOPY_RAM_DISCARD (pages the source will send again) and PACKAGED
// (the device state between LISTEN and RUN).

import { SgmError } from "../errors.ts";
import { Command, Section, TPS } from "./constants.ts";

const latin1 = new TextDecoder("latin1");

export interface Discard {
  block: string;
  /** [first page, page count] pairs. */
  ranges: Array<[number, number]>;
}

/** u8 version 0, counted block name, u8 0, then (be64 start, be64 length) pairs in bytes. */
export function readDiscard(payload: Uint8Array): Discard {
  const fail = (why: string) => new SgmError("data", `migration stream: POSTCOPY_RAM_DISCARD ${why}`);
  if (payload.length < 3 || payload[0] !== 0) throw fail(`of version ${payload[0]}`);
  const n = payload[1]!;
  const start = 2 + n + 1;
  if (payload.length < start || payload[2 + n] !== 0 || (payload.length - start) % 16 !== 0) throw fail(`of ${payload.length} bytes`);
  const block = latin1.decode(payload.subarray(2, 2 + n));
  const dv = new DataView(payload.buffer, payload.byteOffset, payload.length);
  const ranges: Array<[number, number]> = [];
  for (let p = start; p < payload.length; p += 16) {
    const first = dv.getUint32(p) * 0x1_0000_0000 + dv.getUint32(p + 4);
    const length = dv.getUint32(p + 8) * 0x1_0000_0000 + dv.getUint32(p + 12);
    if (first % TPS !== 0 || length % TPS !== 0) throw fail(`range ${first}+${length} of block '${block}' is not in whole pages`);
    ranges.push([first / TPS, length / TPS]);
  }
  return { block, ranges };
}

export interface Package {
  deviceState: Uint8Array;
  /** Values of the PINGs inside, which the source expects answered. */
  pings: number[];
}

const LISTEN = [Section.COMMAND, 0, Command.POSTCOPY_LISTEN, 0, 0];
const RUN = [Section.COMMAND, 0, Command.POSTCOPY_RUN, 0, 0];
const PING_HEAD = [Section.COMMAND, 0, Command.PING, 0, 4];

function startsWith(b: Uint8Array, at: number, bytes: readonly number[]): boolean {
  return at >= 0 && bytes.every((v, i) => b[at + i] === v);
}

/**
 * A PACKAGED blob is LISTEN, the device FULL sections, one or two PINGs
 * (the second, 0x42, from QEMU 10.2), then RUN. The device sections cannot
 * be walked, but they end in a section footer, which no PING can look like.
 */
export function splitPackage(blob: Uint8Array): Package {
  const fail = (why: string) => new SgmError("data", `migration stream: PACKAGED ${why}`);
  if (!startsWith(blob, 0, LISTEN)) throw fail("does not start with POSTCOPY_LISTEN");
  let end = blob.length - RUN.length;
  if (!startsWith(blob, end, RUN)) throw fail("does not end with POSTCOPY_RUN");
  const pings: number[] = [];
  while (startsWith(blob, end - 9, PING_HEAD)) {
    end -= 9;
    pings.unshift(new DataView(blob.buffer, blob.byteOffset + end + 5, 4).getUint32(0));
  }
  const deviceState = blob.subarray(LISTEN.length, end);
  if (deviceState[0] !== Section.FULL || deviceState[deviceState.length - 5] !== Section.FOOTER) {
    throw fail("holds no device sections between LISTEN and its PINGs");
  }
  return { deviceState, pings };
}
