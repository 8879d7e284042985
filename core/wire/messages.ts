// What sgm processes say to each other after authentication. Control
// messages are small JSON objects, checked field by field on arrival; the
// data plane (page maps and page contents) is binary.
//
// PAGE_DATA: u32 count, then count x (32-byte SHA-256 digest, 4096-byte page)
// PAGE_MAP:  u16 vm, u16 0, u32 count, then count x entry:
//            u16 block, u32 page, u8 kind (0 zero, 1 digest, 2 pending), [32-byte digest]
//            (pending: a postcopy source discarded the page and sends it again)
// VM_BYTES:  u16 vm, u8 kind (1 stream header, 2 device state), u8 last, bytes
// LOCATIONS: u32 count, then count x (32-byte digest, u32 relay mask): content
//            the gather must fetch from those relays (bit i: the run's relay i)
// UNPIN:     u32 count, then count x 32-byte digest: content the scatter sent
//            the gather and will not name again unless it sends it again

import { DIGEST_BYTES, PAGE_BYTES, copyBytes } from "../dedup/digest.ts";
import { SgmError } from "../errors.ts";
import type { RamBlockInfo } from "../qemu/stream-reader.ts";
import { probeMaxPayload } from "./probe-frames.ts";
import { relayMaxPayload } from "./relay-messages.ts";

export const FrameType = {
  CONTROL: 16,
  VM_BYTES: 17,
  PAGE_MAP: 18,
  PAGE_DATA: 19,
  LOCATIONS: 27,
  UNPIN: 28,
} as const;

export const MAX_CONTROL = 1024 * 1024;
export const MAX_VM_BYTES = 4 * 1024 * 1024;
/** Pages per PAGE_DATA frame, and entries per PAGE_MAP frame. */
export const DATA_BATCH = 64;
export const MAP_BATCH = 16384;
export const DATA_ENTRY = DIGEST_BYTES + PAGE_BYTES;
export const MAP_ENTRY_ZERO = 7;
export const MAP_ENTRY_DIGEST = 7 + DIGEST_BYTES;
export const LOCATION_ENTRY = DIGEST_BYTES + 4;

export function maxPayload(type: number): number | undefined {
  switch (type) {
    case FrameType.CONTROL:
      return MAX_CONTROL;
    case FrameType.VM_BYTES:
      return 4 + MAX_VM_BYTES;
    case FrameType.PAGE_MAP:
      return 8 + MAP_BATCH * MAP_ENTRY_DIGEST;
    case FrameType.PAGE_DATA:
      return 4 + DATA_BATCH * DATA_ENTRY;
    case FrameType.LOCATIONS:
      return 4 + MAP_BATCH * LOCATION_ENTRY;
    case FrameType.UNPIN:
      return 4 + MAP_BATCH * DIGEST_BYTES;
    default:
      return relayMaxPayload(type) ?? probeMaxPayload(type);
  }
}

export const VmBytesKind = { HEADER: 1, DEVICE_STATE: 2 } as const;
export const MapKind = { ZERO: 0, DIGEST: 1, PENDING: 2 } as const;
/** What readPageMap passes as the digest offset of entries without a digest. */
export const ENTRY_ZERO = -1;
export const ENTRY_PENDING = -2;

// ---- control messages ----------------------------------------------------------

export type Control =
  /** scatter → gather: a VM is coming. startedAt: epoch ms scatter started, for total time. */
  | { t: "offer"; vm: number; name: string; qemu: string; machine: string; startedAt: number }
  | { t: "accept"; vm: number; qemu: string }
  | { t: "refuse"; vm: number; reason: string }
  /** scatter → gather: the RAM block list and section id, after the header bytes. */
  | { t: "blocks"; vm: number; sectionId: number; blocks: RamBlockInfo[] }
  /**
   * scatter → gather: the stream is complete (device state sent); stoppedAt:
   * source STOP, epoch ms; map: the final page map's digest (page-map-digest.ts).
   */
  | { t: "source-done"; vm: number; stoppedAt: number; map: string }
  /**
   * scatter → gather: the source switched to postcopy: the device state is
   * sent and every page it will send again is marked pending.
   */
  | { t: "source-switched"; vm: number; stoppedAt: number }
  /** gather → scatter, after a postcopy source-done: it has every page's content named and held, and this final map. */
  | { t: "held"; vm: number; map: string }
  /** gather → scatter: the destination waits for this pending page; ask the source for it. */
  | { t: "want"; vm: number; block: number; page: number }
  /**
   * gather → scatter: holds everything scatter sent for this VM, ready to
   * switch over; map: its final map's digest (null while a postcopy source still sends).
   */
  | { t: "switch-ready"; vm: number; map: string | null }
  /** scatter → gather: the source has completed; run the VM at the destination. */
  | { t: "switch-go"; vm: number }
  /**
   * gather → scatter: the destination has taken the VM over: it runs
   * (resumedAt: epoch ms of its RESUME), or stays paused as it was started
   * (-S; resumedAt null).
   */
  | { t: "running"; vm: number; resumedAt: number | null }
  /** gather → scatter: the destination holds every page. */
  | { t: "completed"; vm: number; completedAt: number }
  /** either way: this VM's eviction cannot go on; kind: the sender's error kind ("data" when a check found a wrong page map). */
  | { t: "failed"; vm: number; reason: string; kind: string }
  /**
   * scatter → gather: the source's stream was dropped (a relay took content
   * this VM needs with it); the source streams again from its header on,
   * which is not sent again. Forget its device state; answer "restarted".
   */
  | { t: "source-restarted"; vm: number }
  /** gather → scatter: nothing of the dropped stream's device state or switch-ready stands. */
  | { t: "restarted"; vm: number }
  /** gather → scatter: it lost the relay at `address` (it cannot fetch from it); the scatter counts it as gone too. */
  | { t: "relay-lost"; address: string; reason: string }
  /** gather → scatter: PAGE_DATA payload bytes it has taken in so far (scatter's window for direct pages). */
  | { t: "received"; bytes: number }
  /** scatter → gather, before any offer: the run's id (hex) and its relays, in mask bit order. */
  | { t: "relays"; run: string; relays: string[] }
  /** scatter → gather, from `sgm check`: would you take this VM? Nothing is set up. */
  | { t: "check"; vm: number; name: string; qemu: string; machine: string }
  /** gather → scatter: null if it would, else why not; its destination QEMU's version and machine, if it has one. */
  | { t: "check-result"; vm: number; refusal: string | null; qemu: string | null; machine: string | null }
  /** to a relay: its figures, please. */
  /** to a relay: its figures, please, with its room as `run` (hex) sees it. */
  | { t: "relay-stats?"; run: string }
  /** free: what `run` may still fill, once other runs' reservations are set aside; maxRate: its --max-rate, or null. */
  | { t: "relay-stats"; capacity: number; used: number; free: number; reserved: number; pages: number; bytesIn: number; bytesOut: number; runs: number; maxRate: number | null }
  /** to a relay: hold room for `bytes` of `run`'s pages (counting those it holds); 0 gives back what it did not use. */
  | { t: "relay-reserve"; run: string; bytes: number }
  /** relay → client: the bytes reserved for the run, which may be less than asked. */
  | { t: "relay-reserved"; run: string; bytes: number }
  /** relay → client, on its first refused put: it is full. */
  | { t: "relay-full"; capacity: number; used: number }
  /** to a relay: drop everything kept for the keeper `run` (see RELAY_KEEP). */
  | { t: "relay-unkeep"; run: string }
  /** relay → client: how many pages it kept for it. */
  | { t: "relay-unkept"; run: string; pages: number };

type ControlType = Control["t"];

const FIELDS: Record<ControlType, Record<string, "number" | "number|null" | "string" | "string|null" | "strings" | "blocks">> = {
  offer: { vm: "number", name: "string", qemu: "string", machine: "string", startedAt: "number" },
  accept: { vm: "number", qemu: "string" },
  refuse: { vm: "number", reason: "string" },
  blocks: { vm: "number", sectionId: "number", blocks: "blocks" },
  "source-done": { vm: "number", stoppedAt: "number", map: "string" },
  "source-switched": { vm: "number", stoppedAt: "number" },
  want: { vm: "number", block: "number", page: "number" },
  held: { vm: "number", map: "string" },
  "switch-ready": { vm: "number", map: "string|null" },
  "switch-go": { vm: "number" },
  running: { vm: "number", resumedAt: "number|null" },
  completed: { vm: "number", completedAt: "number" },
  failed: { vm: "number", reason: "string", kind: "string" },
  "source-restarted": { vm: "number" },
  restarted: { vm: "number" },
  "relay-lost": { address: "string", reason: "string" },
  received: { bytes: "number" },
  relays: { run: "string", relays: "strings" },
  check: { vm: "number", name: "string", qemu: "string", machine: "string" },
  "check-result": { vm: "number", refusal: "string|null", qemu: "string|null", machine: "string|null" },
  "relay-stats?": { run: "string" },
  "relay-stats": {
    capacity: "number",
    used: "number",
    free: "number",
    reserved: "number",
    pages: "number",
    bytesIn: "number",
    bytesOut: "number",
    runs: "number",
    maxRate: "number|null",
  },
  "relay-reserve": { run: "string", bytes: "number" },
  "relay-unkeep": { run: "string" },
  "relay-unkept": { run: "string", pages: "number" },
  "relay-reserved": { run: "string", bytes: "number" },
  "relay-full": { capacity: "number", used: "number" },
};

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

export function encodeControl(message: Control): Uint8Array {
  return encoder.encode(JSON.stringify(message));
}

export function decodeControl(payload: Uint8Array): Control {
  let value: unknown;
  try {
    value = JSON.parse(decoder.decode(payload));
  } catch {
    throw new SgmError("data", "control message is not JSON");
  }
  if (typeof value !== "object" || value === null || typeof (value as { t?: unknown }).t !== "string") {
    throw new SgmError("data", "control message without a type");
  }
  const record = value as Record<string, unknown>;
  const fields = FIELDS[record.t as ControlType];
  if (!fields) throw new SgmError("data", `unknown control message '${String(record.t).slice(0, 40)}'`);
  for (const [field, kind] of Object.entries(fields)) {
    const v = record[field];
    const ok =
      kind === "blocks"
        ? isBlockList(v)
        : kind === "strings"
          ? Array.isArray(v) && v.length <= 32 && v.every((x) => typeof x === "string" && x.length < 300)
          : kind === "number|null"
            ? v === null || (typeof v === "number" && Number.isFinite(v))
            : kind === "string|null"
              ? v === null || typeof v === "string"
              : typeof v === kind && (kind !== "number" || Number.isFinite(v));
    if (!ok) throw new SgmError("data", `control message '${record.t}': bad or missing '${field}'`);
  }
  return record as unknown as Control;
}

function isBlockList(v: unknown): v is RamBlockInfo[] {
  return (
    Array.isArray(v) &&
    v.length > 0 &&
    v.length <= 1024 &&
    v.every(
      (b) =>
        typeof b === "object" &&
        b !== null &&
        typeof b.name === "string" &&
        b.name.length > 0 &&
        b.name.length < 256 &&
        Number.isSafeInteger(b.usedLength) &&
        b.usedLength > 0 &&
        b.usedLength % PAGE_BYTES === 0,
    )
  );
}

// ---- VM_BYTES ---------------------------------------------------------------------

export function encodeVmBytes(vm: number, kind: number, last: boolean, bytes: Uint8Array): Uint8Array {
  const out = new Uint8Array(4 + bytes.length);
  const dv = new DataView(out.buffer);
  dv.setUint16(0, vm);
  out[2] = kind;
  out[3] = last ? 1 : 0;
  out.set(bytes, 4);
  return out;
}

export function decodeVmBytes(payload: Uint8Array): { vm: number; kind: number; last: boolean; bytes: Uint8Array } {
  if (payload.length < 4) throw new SgmError("data", "VM_BYTES frame shorter than its header");
  const dv = new DataView(payload.buffer, payload.byteOffset, payload.length);
  const kind = payload[2]!;
  if (kind !== VmBytesKind.HEADER && kind !== VmBytesKind.DEVICE_STATE) throw new SgmError("data", `VM_BYTES of unknown kind ${kind}`);
  return { vm: dv.getUint16(0), kind, last: payload[3] === 1, bytes: payload.subarray(4) };
}

// ---- PAGE_MAP ---------------------------------------------------------------------

/** Walks a PAGE_MAP payload; `digestAt` is an offset into `payload`, or ENTRY_ZERO, or ENTRY_PENDING. */
export function readPageMap(
  payload: Uint8Array,
  visit: (vm: number, block: number, page: number, digestAt: number) => void,
): void {
  if (payload.length < 8) throw new SgmError("data", "PAGE_MAP frame shorter than its header");
  const dv = new DataView(payload.buffer, payload.byteOffset, payload.length);
  const vm = dv.getUint16(0);
  const count = dv.getUint32(4);
  let p = 8;
  for (let n = 0; n < count; n++) {
    if (p + MAP_ENTRY_ZERO > payload.length) throw new SgmError("data", `PAGE_MAP frame ends inside entry ${n} of ${count}`);
    const block = dv.getUint16(p);
    const page = dv.getUint32(p + 2);
    const kind = payload[p + 6]!;
    if (kind === MapKind.ZERO || kind === MapKind.PENDING) {
      visit(vm, block, page, kind === MapKind.ZERO ? ENTRY_ZERO : ENTRY_PENDING);
      p += MAP_ENTRY_ZERO;
    } else if (kind === MapKind.DIGEST) {
      if (p + MAP_ENTRY_DIGEST > payload.length) throw new SgmError("data", `PAGE_MAP frame ends inside entry ${n} of ${count}`);
      visit(vm, block, page, p + MAP_ENTRY_ZERO);
      p += MAP_ENTRY_DIGEST;
    } else {
      throw new SgmError("data", `PAGE_MAP entry of unknown kind ${kind}`);
    }
  }
  if (p !== payload.length) throw new SgmError("data", `PAGE_MAP frame has ${payload.length - p} bytes after its ${count} entries`);
}

/** Builds PAGE_MAP payloads entry by entry, in buffers from `acquire`. */
export class PageMapBuilder {
  static readonly BUFFER_BYTES = 8 + MAP_BATCH * MAP_ENTRY_DIGEST;
  private readonly acquire: () => Uint8Array;
  private buf: Uint8Array;
  private dv: DataView;
  private len = 8;
  private count = 0;

  constructor(acquire: () => Uint8Array = () => new Uint8Array(PageMapBuilder.BUFFER_BYTES)) {
    this.acquire = acquire;
    this.buf = acquire();
    this.dv = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.byteLength);
  }

  get entries(): number {
    return this.count;
  }

  get full(): boolean {
    return this.count >= MAP_BATCH;
  }

  addZero(block: number, page: number): void {
    this.addShort(block, page, MapKind.ZERO);
  }

  addPending(block: number, page: number): void {
    this.addShort(block, page, MapKind.PENDING);
  }

  private addShort(block: number, page: number, kind: number): void {
    this.dv.setUint16(this.len, block);
    this.dv.setUint32(this.len + 2, page);
    this.buf[this.len + 6] = kind;
    this.len += MAP_ENTRY_ZERO;
    this.count++;
  }

  /** Adds an entry with the digest at digests[digestAt .. digestAt + 32); returns where it is in `buffer`. */
  addDigest(block: number, page: number, digests: Uint8Array, digestAt: number): number {
    this.dv.setUint16(this.len, block);
    this.dv.setUint32(this.len + 2, page);
    this.buf[this.len + 6] = MapKind.DIGEST;
    const at = this.len + MAP_ENTRY_ZERO;
    copyBytes(digests, digestAt, this.buf, at, DIGEST_BYTES);
    this.len += MAP_ENTRY_DIGEST;
    this.count++;
    return at;
  }

  /** The buffer the entries so far are in, until take(). */
  get buffer(): Uint8Array {
    return this.buf;
  }

  /** The finished payload for `vm` (a view of `buffer`); the builder starts on a new buffer. */
  take(vm: number): { payload: Uint8Array; buffer: Uint8Array } {
    this.dv.setUint16(0, vm);
    this.dv.setUint16(2, 0);
    this.dv.setUint32(4, this.count);
    const buffer = this.buf;
    const payload = buffer.subarray(0, this.len);
    this.buf = this.acquire();
    this.dv = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.byteLength);
    this.len = 8;
    this.count = 0;
    return { payload, buffer };
  }
}

// ---- PAGE_DATA --------------------------------------------------------------------

export function readPageData(payload: Uint8Array, visit: (digestAt: number, pageAt: number) => void): void {
  if (payload.length < 4) throw new SgmError("data", "PAGE_DATA frame shorter than its header");
  const count = new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0);
  if (payload.length !== 4 + count * DATA_ENTRY) {
    throw new SgmError("data", `PAGE_DATA frame of ${payload.length} bytes does not hold ${count} pages`);
  }
  for (let n = 0, p = 4; n < count; n++, p += DATA_ENTRY) visit(p, p + DIGEST_BYTES);
}

/** Builds PAGE_DATA payloads page by page, in buffers from `acquire`. */
export class PageDataBuilder {
  static readonly BUFFER_BYTES = 4 + DATA_BATCH * DATA_ENTRY;
  private readonly acquire: () => Uint8Array;
  private buf: Uint8Array;
  private count = 0;

  constructor(acquire: () => Uint8Array = () => new Uint8Array(PageDataBuilder.BUFFER_BYTES)) {
    this.acquire = acquire;
    this.buf = acquire();
  }

  get pages(): number {
    return this.count;
  }

  get full(): boolean {
    return this.count >= DATA_BATCH;
  }

  /** Copies the page in, with its digest from digests[digestAt .. digestAt + 32). */
  add(page: Uint8Array, digests: Uint8Array, digestAt: number): void {
    const at = 4 + this.count * DATA_ENTRY;
    copyBytes(digests, digestAt, this.buf, at, DIGEST_BYTES);
    this.buf.set(page, at + DIGEST_BYTES);
    this.count++;
  }

  take(): { payload: Uint8Array; buffer: Uint8Array } {
    new DataView(this.buf.buffer, this.buf.byteOffset, 4).setUint32(0, this.count);
    const buffer = this.buf;
    const payload = buffer.subarray(0, 4 + this.count * DATA_ENTRY);
    this.buf = this.acquire();
    this.count = 0;
    return { payload, buffer };
  }
}

// ---- UNPIN --------------------------------------------------------------------------

export function encodeDigests(digests: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(4 + digests.length * DIGEST_BYTES);
  new DataView(out.buffer).setUint32(0, digests.length);
  digests.forEach((d, n) => out.set(d, 4 + n * DIGEST_BYTES));
  return out;
}

export function readDigests(payload: Uint8Array, visit: (digestAt: number) => void): void {
  if (payload.length < 4) throw new SgmError("data", "UNPIN frame shorter than its header");
  const count = new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0);
  if (payload.length !== 4 + count * DIGEST_BYTES) throw new SgmError("data", `UNPIN frame of ${payload.length} bytes does not hold ${count} digests`);
  for (let n = 0; n < count; n++) visit(4 + n * DIGEST_BYTES);
}

// ---- LOCATIONS ------------------------------------------------------------------------

export function encodeLocations(entries: ReadonlyArray<{ digest: Uint8Array; mask: number }>): Uint8Array {
  const out = new Uint8Array(4 + entries.length * LOCATION_ENTRY);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, entries.length);
  entries.forEach((e, n) => {
    out.set(e.digest, 4 + n * LOCATION_ENTRY);
    dv.setUint32(4 + n * LOCATION_ENTRY + DIGEST_BYTES, e.mask >>> 0);
  });
  return out;
}

export function readLocations(payload: Uint8Array, visit: (digestAt: number, mask: number) => void): void {
  if (payload.length < 4) throw new SgmError("data", "LOCATIONS frame shorter than its header");
  const dv = new DataView(payload.buffer, payload.byteOffset, payload.length);
  const count = dv.getUint32(0);
  if (payload.length !== 4 + count * LOCATION_ENTRY) throw new SgmError("data", `LOCATIONS frame of ${payload.length} bytes does not hold ${count} entries`);
  for (let n = 0; n < count; n++) {
    const at = 4 + n * LOCATION_ENTRY;
    const mask = dv.getUint32(at + DIGEST_BYTES);
    if (mask === 0) throw new SgmError("data", "LOCATIONS entry names no relay");
    visit(at, mask);
  }
}
