// Control messages between sgm processes: small JSON objects in CONTROL
// frames, checked field by field on arrival, so that a peer's mistake (or a
// peer holding the key and meaning harm) is refused as data, never trusted.

import { PAGE_BYTES } from "../dedup/digest.ts";
import { SgmError } from "../errors.ts";
import type { RamBlockInfo } from "../qemu/stream-reader.ts";

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

