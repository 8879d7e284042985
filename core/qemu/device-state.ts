// The tail of a precopy stream: every byte after the RAM END section. The
// device state in it cannot be walked without knowing every device's vmstate,
// so it is kept as opaque bytes, running from the RAM END section to the EOF
// byte, located through the VMDESCRIPTION record that follows it.

import type { SgmError } from "../errors.ts";
import { Section } from "./constants.ts";

export interface VmDescription {
  devices: Array<{ name: string; instance_id: number }>;
}

/** Bound on buffered device state or packaged blob: far above any real VM's. */
export const MAX_DEVICE_STATE = 256 * 1024 * 1024;

const latin1 = new TextDecoder("latin1");

export class DeviceStateTail {
  /** Builds the error to throw; the reader's, so that it ends the stream too. */
  private readonly fail: (message: string) => SgmError;
  private tail = new Uint8Array(0);
  private tailLen = 0;

  constructor(fail: (message: string) => SgmError) {
    this.fail = fail;
  }

  get length(): number {
    return this.tailLen;
  }

  append(src: Uint8Array, from: number): void {
    const n = src.length - from;
    if (n <= 0) return;
    if (this.tailLen + n > MAX_DEVICE_STATE) throw this.fail(`device state larger than ${MAX_DEVICE_STATE} bytes`);
    if (this.tailLen + n > this.tail.length) {
      const grown = new Uint8Array(Math.max(this.tailLen + n, this.tail.length * 2, 256 * 1024));
      grown.set(this.tail.subarray(0, this.tailLen));
      this.tail = grown;
    }
    this.tail.set(src.subarray(from), this.tailLen);
    this.tailLen += n;
  }

  /** The precopy stream is complete once it ends in EOF, VMDESCRIPTION, len, JSON. */
  complete(): { device: Uint8Array; vmdesc: VmDescription } | null {
    if (this.tailLen === 0 || this.tail[this.tailLen - 1] !== 0x7d /* } */) return null;
    const found = this.findVmdesc();
    if (!found) return null;
    const device = this.tail.subarray(0, found.q - 1);
    this.validateDeviceState(device, found.vmdesc);
    return { device, vmdesc: found.vmdesc };
  }

  /** The device state, if the tail ends with the EOF byte and no vmdesc. */
  withoutVmdesc(): Uint8Array | null {
    const t = this.tail.subarray(0, this.tailLen);
    // suppress-vmdesc machines end with the EOF byte alone
    if (this.tailLen > 0 && t[this.tailLen - 1] === Section.EOF && !this.findVmdesc()) {
      return t.subarray(0, this.tailLen - 1);
    }
    return null;
  }

  private findVmdesc(): { q: number; vmdesc: VmDescription } | null {
    const t = this.tail;
    const len = this.tailLen;
    const dv = new DataView(t.buffer, t.byteOffset, len);
    for (let q = len - 7; q >= 1; q--) {
      if (t[q] !== Section.VMDESCRIPTION || t[q - 1] !== Section.EOF || t[q + 5] !== 0x7b /* { */) continue;
      if (dv.getUint32(q + 1) !== len - q - 5) continue;
      try {
        const vmdesc = JSON.parse(latin1.decode(t.subarray(q + 5, len))) as VmDescription;
        if (Array.isArray(vmdesc.devices)) return { q, vmdesc };
      } catch {
        // a chance match inside device data; keep looking
      }
    }
    return null;
  }

  /** Walks the FULL sections along the vmdesc's device list, to be sure where they end. */
  private validateDeviceState(device: Uint8Array, vmdesc: VmDescription): void {
    if (device.length === 0 || device[0] !== Section.FULL) {
      throw this.fail("device state does not start with a FULL section");
    }
    const dv = new DataView(device.buffer, device.byteOffset, device.length);
    let pos = 0;
    for (let i = 0; i < vmdesc.devices.length; i++) {
      const want = vmdesc.devices[i]!;
      if (device[pos] !== Section.FULL || pos + 6 > device.length) throw this.fail(`device section ${i} ('${want.name}') is not a FULL section`);
      const id = dv.getUint32(pos + 1);
      const n = device[pos + 5]!;
      const name = latin1.decode(device.subarray(pos + 6, pos + 6 + n));
      const instance = dv.getUint32(pos + 6 + n);
      if (name !== want.name || instance !== want.instance_id) {
        throw this.fail(`device section ${i} is '${name}' #${instance}, the description says '${want.name}' #${want.instance_id}`);
      }
      const footer = [Section.FOOTER, (id >>> 24) & 0xff, (id >>> 16) & 0xff, (id >>> 8) & 0xff, id & 0xff];
      const next = vmdesc.devices[i + 1];
      let found = -1;
      for (let f = device.indexOf(Section.FOOTER, pos + 14 + n); f >= 0; f = device.indexOf(Section.FOOTER, f + 1)) {
        if (!footer.every((byte, k) => device[f + k] === byte)) continue;
        const after = f + 5;
        if (next === undefined ? after === device.length : device[after] === Section.FULL && this.sectionNameAt(device, after) === next.name) {
          found = after;
          break;
        }
      }
      if (found < 0) throw this.fail(`cannot find the end of device section '${want.name}'`);
      pos = found;
    }
    if (pos !== device.length) throw this.fail(`${device.length - pos} bytes of device state beyond the described devices`);
  }

  private sectionNameAt(b: Uint8Array, pos: number): string {
    const n = b[pos + 5];
    return n === undefined ? "" : latin1.decode(b.subarray(pos + 6, pos + 6 + n));
  }
}
