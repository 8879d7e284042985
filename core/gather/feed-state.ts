// A VM's page table and the content it names, to the saved state of
// resume-state.ts and back. Saving happens once the page map is final and
// the VM runs at the destination; restoring, in a gather started with
// --resume, against the received bitmap the paused destination reports.

import { DIGEST_BYTES, digestPage } from "../dedup/digest.ts";
import { SgmError } from "../errors.ts";
import type { RamBlockInfo } from "../qemu/stream-reader.ts";
import type { ContentDirectory } from "./content-directory.ts";
import { finalMapDigest } from "./final-checks.ts";
import { PageTable, UNKNOWN, ZERO } from "./page-table.ts";
import { type ResumeState, SAVED_ZERO } from "./resume-state.ts";

/** The run a VM came in: its id on the relays (hex) and the relays, in mask bit order. */
export interface SavedRun {
  run: string;
  relays: string[];
}

/** What the report of a resumed VM tells of its start. */
export interface SavedOrigin extends SavedRun {
  /** The scatter's start (epoch ms) and the source's QEMU version. */
  startedAt: number | null;
  sourceQemu: string | null;
}

export interface FeedIdentity extends SavedOrigin {
  name: string;
  blocks: readonly RamBlockInfo[];
  sectionId: number;
  /** The final map's digest, as agreed with the scatter. */
  map: string;
}

/** A state taken now, and what lets go of the bytes it names once written. */
export interface FeedSnapshot {
  state: ResumeState;
  release: () => void;
}

/**
 * Every page's final content, and which pages the destination confirmed;
 * for the rest, where their content is, and the bytes of what only the
 * gather holds: taken at one instant, written while delivery goes on
 * (saveResumeState). Content a page still owes is here or on a relay:
 * the page's need keeps it so. The bytes are not copied: the snapshot holds
 * a need of its own on them until release, as a copy cost the gather up to
 * the pages it may hold again (32 MiB, kept by the allocator past the write).
 */
export function snapshotFeedState(who: FeedIdentity, t: PageTable, dir: ContentDirectory): FeedSnapshot {
  let top = -1;
  for (let i = 0; i < t.total; i++) if (t.content[i]! > top) top = t.content[i]!;
  // content ids are dense: an array maps them to the state's numbers
  const index = new Int32Array(top + 1).fill(-1);
  const pages = new Int32Array(t.total);
  const atDestination = new Uint8Array(t.total);
  const cids = new Int32Array(top + 1);
  let contents = 0;
  for (let i = 0; i < t.total; i++) {
    const c = t.content[i]!;
    if (c === ZERO || c === UNKNOWN) {
      pages[i] = SAVED_ZERO;
      continue;
    }
    if (c < 0) throw new SgmError("internal", `VM ${who.name}: saving a page the source still owes`);
    let k = index[c]!;
    if (k < 0) {
      k = index[c] = contents;
      cids[contents++] = c;
    }
    pages[i] = k;
    // a page written since the switch owes its content until the destination confirms it
    atDestination[i] = t.delivered[i] === 1 && t.owing[i] === 0 ? 1 : 0;
  }
  const digests = new Uint8Array(contents * DIGEST_BYTES);
  const relayMasks = new Uint32Array(contents);
  const owed = new Uint8Array(contents);
  for (let i = 0; i < t.total; i++) if (pages[i]! >= 0 && !atDestination[i]) owed[pages[i]!] = 1;
  const localIndex: number[] = [];
  for (let k = 0; k < contents; k++) {
    const c = cids[k]!;
    dir.copyDigest(c, digests, k * DIGEST_BYTES);
    relayMasks[k] = dir.relayMask(c);
    if (!owed[k]) continue;
    if (dir.isLocal(c)) localIndex.push(k);
    else if (relayMasks[k] === 0) throw new SgmError("internal", `VM ${who.name}: content a page still owes is held nowhere`);
  }
  // held only once nothing can throw, so that a failed snapshot holds nothing
  const localPages = localIndex.map((k) => {
    dir.need(cids[k]!);
    return dir.data(cids[k]!);
  });
  let held = true;
  const release = () => {
    if (!held) return;
    held = false;
    for (const k of localIndex) dir.unneed(cids[k]!);
  };
  return { state: { ...who, blocks: [...who.blocks], pages, atDestination, digests, relayMasks, localIndex, localPages }, release };
}

/**
 * Fills a fresh page table and directory from a saved state, before the
 * destination says what it received: every page not confirmed there owes
 * its content (needs it), so that nothing another VM of the run may still
 * lack is let go while the destinations answer one by one. Checks the
 * restored map against the digest agreed with the source, and the saved
 * bytes against their digests, before QEMU is touched.
 */
export function claimSavedState(state: ResumeState, t: PageTable, dir: ContentDirectory): void {
  if (t.total !== state.pages.length) throw new SgmError("data", `VM ${state.name}: the saved state has ${state.pages.length} pages, the destination ${t.total}`);
  const cids = Array.from(state.relayMasks, (mask, k) => {
    const cid = dir.intern(state.digests, k * DIGEST_BYTES);
    dir.restore(cid, mask);
    return cid;
  });
  for (let i = 0; i < t.total; i++) {
    const k = state.pages[i]!;
    const c = k === SAVED_ZERO ? ZERO : cids[k]!;
    t.content[i] = c;
    if (state.atDestination[i]) {
      t.delivered[i] = 1;
      t.fed[i] = c;
      t.written[i] = c;
    } else if (c >= 0) {
      dir.need(c);
      t.owing[i] = 1;
    }
  }
  const digest = new Uint8Array(DIGEST_BYTES);
  state.localIndex.forEach((k, j) => {
    const bytes = state.localPages[j]!;
    digestPage(bytes, digest);
    if (digest.some((b, n) => b !== state.digests[k * DIGEST_BYTES + n])) throw new SgmError("data", `VM ${state.name}: saved content ${k} does not match its digest`);
    dir.fetched(cids[k]!, bytes);
  });
  const map = finalMapDigest(state.name, t, dir);
  if (map !== state.map) {
    throw new SgmError("data", `VM ${state.name}: the saved state's page map (digest ${map.slice(0, 16)}) is not the one agreed with the source (${state.map.slice(0, 16)})`);
  }
}

/**
 * What the destination says it received: those pages are there in their
 * final version (QEMU takes a page once, and after the switch only in its
 * final version), and owe nothing more; content no page needs is let go.
 */
export function settleReceived(name: string, t: PageTable, dir: ContentDirectory, received: (i: number) => boolean): void {
  for (let i = 0; i < t.total; i++) {
    const has = received(i);
    if (t.delivered[i] === 1) {
      if (!has) throw new SgmError("data", `VM ${name}: the destination lacks page ${i}, which it had confirmed before the gather stopped`);
      continue;
    }
    if (!has) continue;
    const c = t.content[i]!;
    t.delivered[i] = 1;
    t.fed[i] = c;
    t.written[i] = c;
    if (t.owing[i] === 1) {
      t.owing[i] = 0;
      dir.unneed(c);
    }
  }
}
