// What a gather saves of one VM once the VM runs at the destination, so a
// gather restarted with --resume can finish its migration alone: the
// destination QEMU keeps what it has received (postcopy-paused) and says
// which pages in its received bitmap; this file says what every other page
// must be and where its content is: on the run's relays (by digest, under
// the run's id) or, for content only the gather held, the bytes themselves.
//
// It lives on the destination host, beside the QEMU it serves: a gather
// crash leaves it, and whatever takes the host down takes that QEMU too, so
// nothing further away would save the VM. It is written whole and renamed
// into place, so it is never seen half written; it is not fsynced, for the
// same reason. It holds guest memory: mode 0600, and it is removed once the
// migration completed.
//
// The whole final page map is kept, so a resumed gather checks it against
// the digest scatter and gather agreed on before it sends a single page.
//
// Layout: "SGMRSM02", be32 length of a JSON description, the JSON, then
// per page an i32 (SAVED_ZERO or a content number, little-endian) and a
// byte (1: the destination confirmed the page); per content its 32-byte
// digest and a u32 relay mask; then the bytes of the contents held here.

import { closeSync, lstatSync, mkdirSync, openSync, readFileSync, rmSync } from "node:fs";
import { open, rename, rm } from "node:fs/promises";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { DIGEST_BYTES, PAGE_BYTES } from "../dedup/digest.ts";
import { SgmError } from "../errors.ts";
import type { RamBlockInfo } from "../qemu/stream-reader.ts";

// 02: page digests are BLAKE3 (b409df3); a state saved with SHA-256's is not read as if its digests were
const MAGIC = new TextEncoder().encode("SGMRSM02");
const EARLIER_MAGIC = new TextEncoder().encode("SGMRSM01");
/** Page: all zero (the destination reads it as zero unless given other content). */
export const SAVED_ZERO = -1;
/** Saved pages written at once: 1 MiB. */
const WRITE_PAGES = 256;

export interface ResumeState {
  name: string;
  blocks: RamBlockInfo[];
  sectionId: number;
  /** The run's id on its relays (hex) and the relays, in relay-mask bit order. */
  run: string;
  relays: string[];
  /** The final page map's digest, as scatter and gather agreed on it. */
  map: string;
  /** The scatter's start (epoch ms) and the source's QEMU version, for the report. */
  startedAt: number | null;
  sourceQemu: string | null;
  /** Per page: SAVED_ZERO or an index into the contents. */
  pages: Int32Array;
  /** Per page: 1 if the destination confirmed it has the page. */
  atDestination: Uint8Array;
  /** Per content: its digest (DIGEST_BYTES each) and the relays holding it. */
  digests: Uint8Array;
  relayMasks: Uint32Array;
  /**
   * The contents whose bytes only the gather held, and those bytes, a page
   * each, in that order: when saving, views into the gather's store, which
   * must hold them until saveResumeState is over.
   */
  localIndex: number[];
  localPages: Uint8Array[];
}

/** The state's JSON part: everything but the arrays, which follow it, counted here. */
type Description = Omit<ResumeState, "pages" | "atDestination" | "digests" | "relayMasks" | "localIndex" | "localPages"> & {
  pages: number;
  contents: number;
  /** Indices of the contents whose bytes follow. */
  local: number[];
};

/** The file that holds a VM's state: named by the VM and its destination's QMP address, so two gathers on one host never share one. */
export function resumeStatePath(dir: string, name: string, qmp: string): string {
  const tag = createHash("sha256").update(qmp).digest("hex").slice(0, 12);
  return join(dir, `${name.replace(/[^A-Za-z0-9_.-]/g, "_")}-${tag}.resume`);
}

/** Where the VM's monitor holder listens (qmp/monitor-holder.ts): beside its state, which a --resume needs as well. */
export function holderSocketPath(statePath: string): string {
  return statePath.replace(/\.resume$/, ".qmp");
}

/**
 * Makes sure states can be saved in `dir`, and only by us: a state read
 * back is trusted to say what the guest's memory is. A clear error now
 * beats a VM that cannot be resumed later.
 */
export function prepareStateDir(dir: string): void {
  let why: string | null = null;
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const st = lstatSync(dir);
    const uid = process.getuid?.();
    if (!st.isDirectory()) why = "not a directory";
    else if (uid !== undefined && st.uid !== uid) why = `owned by uid ${st.uid}, not by this user (${uid})`;
    else if ((st.mode & 0o022) !== 0) why = `writable by others (mode ${(st.mode & 0o777).toString(8)})`;
    else {
      const probe = join(dir, `.probe-${process.pid}`);
      rmSync(probe, { force: true });
      closeSync(openSync(probe, "wx", 0o600));
      rmSync(probe);
    }
  } catch (err) {
    why = (err as Error).message;
  }
  if (why) throw new SgmError("usage", `--state-dir ${dir}: cannot keep states there: ${why}`);
}

/** Writes the state whole, then renames it into place; returns the bytes written. */
export async function saveResumeState(path: string, state: ResumeState): Promise<number> {
  const description: Description = {
    name: state.name,
    blocks: state.blocks.map((b) => ({ name: b.name, usedLength: b.usedLength })),
    sectionId: state.sectionId,
    run: state.run,
    relays: state.relays,
    map: state.map,
    startedAt: state.startedAt,
    sourceQemu: state.sourceQemu,
    pages: state.pages.length,
    contents: state.relayMasks.length,
    local: state.localIndex,
  };
  const json = new TextEncoder().encode(JSON.stringify(description));
  const head = new Uint8Array(MAGIC.length + 4);
  head.set(MAGIC);
  new DataView(head.buffer).setUint32(MAGIC.length, json.length);
  const parts: Uint8Array[] = [head, json, le(state.pages), state.atDestination, state.digests, le(state.relayMasks)];
  const tmp = `${path}.${process.pid}.tmp`;
  // exclusive: never through a link someone left in its place
  await rm(tmp, { force: true });
  const file = await open(tmp, "wx", 0o600);
  let written = 0;
  const write = async (part: Uint8Array) => {
    for (let at = 0; at < part.length; ) at += (await file.write(part, at, part.length - at)).bytesWritten;
    written += part.length;
  };
  try {
    for (const part of parts) await write(part);
    // the pages are views into the gather's store: written a batch at a time, not copied all at once
    const batch = new Uint8Array(Math.min(state.localPages.length, WRITE_PAGES) * PAGE_BYTES);
    for (let first = 0; first < state.localPages.length; first += WRITE_PAGES) {
      const n = Math.min(WRITE_PAGES, state.localPages.length - first);
      for (let j = 0; j < n; j++) batch.set(state.localPages[first + j]!, j * PAGE_BYTES);
      await write(batch.subarray(0, n * PAGE_BYTES));
    }
  } catch (err) {
    await file.close();
    await rm(tmp, { force: true });
    throw err;
  }
  await file.close();
  await rename(tmp, path);
  return written;
}

export function loadResumeState(path: string): ResumeState {
  let bytes: Uint8Array;
  try {
    // a plain Uint8Array: its slice copies, where a Buffer's would share
    bytes = new Uint8Array(readFileSync(path));
  } catch (err) {
    const missing = (err as NodeJS.ErrnoException).code === "ENOENT";
    throw new SgmError(
      missing ? "unavailable" : "data",
      missing ? `no saved state at ${path}: the gather stopped before this VM ran at the destination, or its migration ended` : `${path}: ${(err as Error).message}`,
    );
  }
  const bad = (why: string) => new SgmError("data", `${path}: not a state sgm saved (${why})`);
  if (bytes.length >= MAGIC.length && EARLIER_MAGIC.every((b, i) => bytes[i] === b)) {
    throw new SgmError("data", `${path}: saved by an earlier sgm, whose page digests were SHA-256: resume with that sgm`);
  }
  if (bytes.length < MAGIC.length + 4 || MAGIC.some((b, i) => bytes[i] !== b)) throw bad("no magic");
  const jsonLength = new DataView(bytes.buffer, bytes.byteOffset).getUint32(MAGIC.length);
  let at = MAGIC.length + 4;
  let d: Description;
  try {
    d = JSON.parse(new TextDecoder().decode(bytes.subarray(at, at + jsonLength))) as Description;
  } catch {
    throw bad("its description is not JSON");
  }
  at += jsonLength;
  const expected = at + 5 * d.pages + (DIGEST_BYTES + 4) * d.contents + PAGE_BYTES * d.local.length;
  if (bytes.length !== expected) throw bad(`${bytes.length} bytes where ${expected} were expected`);
  const take = (n: number) => {
    const part = bytes.slice(at, at + n);
    at += n;
    return part;
  };
  const pages = new Int32Array(take(4 * d.pages).buffer);
  const atDestination = take(d.pages);
  const digests = take(DIGEST_BYTES * d.contents);
  const relayMasks = new Uint32Array(take(4 * d.contents).buffer);
  for (const k of d.local) if (!(k >= 0 && k < d.contents)) throw bad(`local content ${k}`);
  const localBytes = take(PAGE_BYTES * d.local.length);
  const localPages = d.local.map((_, j) => localBytes.subarray(j * PAGE_BYTES, (j + 1) * PAGE_BYTES));
  for (const p of pages) if (p < SAVED_ZERO || p >= d.contents) throw bad(`page names content ${p}`);
  return { name: d.name, blocks: d.blocks, sectionId: d.sectionId, run: d.run, relays: d.relays, map: d.map, startedAt: d.startedAt, sourceQemu: d.sourceQemu, pages, atDestination, digests, relayMasks, localIndex: d.local, localPages };
}

/** A typed array's bytes: little-endian, the only order sgm runs on (checked below). */
function le(array: Int32Array | Uint32Array): Uint8Array {
  return new Uint8Array(array.buffer, array.byteOffset, array.byteLength);
}

if (new Uint8Array(new Uint32Array([1]).buffer)[0] !== 1) throw new SgmError("internal", "sgm runs only on little-endian hosts");
