// Proves two guests' memory equal: dumps guest-physical RAM with QMP pmemsave
// and compares it page by page, knowing the test guest's page format (see
// test/guest/guest.c and churn.c). A destination that kept running after the
// migration may have rewritten pages since; such a page is accepted only if
// it carries a newer version than the source's final copy and is itself
// intact.

import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { DIGEST_BYTES, digestPage } from "../../core/dedup/digest.ts";
import { ZERO_PAGE_DIGEST } from "../../core/dedup/page-map-digest.ts";
import type { GuestLayout, TestVm } from "./qemu.ts";

const PAGE = 4096;
const MAGIC = 0x50474d53;
const VGA_HOLE_START = 0xa0000;
const VGA_HOLE_END = 0x100000;

export async function dumpMemory(vm: TestVm, dir: string, label: string): Promise<Uint8Array> {
  const file = join(dir, `${vm.name}.${label}.mem`);
  await vm.qmp.execute("pmemsave", { val: 0, size: vm.memBytes, filename: file }, { timeoutMs: 120_000 });
  const bytes = new Uint8Array(readFileSync(file));
  rmSync(file);
  return bytes;
}

export interface MemoryComparison {
  pages: number;
  identical: number;
  /** Data pages the destination guest rewrote after it resumed. */
  rewrittenAfter: number;
  /**
   * The page the source stopped in the middle of writing (at most one): torn
   * in the source's final memory, finished or rewritten at the destination.
   */
  finishedAfter: number;
  /** Churn pages (and table entries) the destination rewrote after it resumed. */
  churnRewrittenAfter: number;
  /** Frames that differ without a legitimate reason: must be empty. */
  mismatched: number[];
}

function mix(x: number): number {
  x = (x ^ (x >>> 16)) >>> 0;
  x = Math.imul(x, 0x7feb352d) >>> 0;
  x = (x ^ (x >>> 15)) >>> 0;
  x = Math.imul(x, 0x846ca68b) >>> 0;
  return (x ^ (x >>> 16)) >>> 0;
}

export function checkWord(frame: number, version: number, seed: number, tlo: number, thi: number): number {
  return mix((frame ^ mix((version ^ mix((seed ^ mix((tlo ^ mix(thi)) >>> 0)) >>> 0)) >>> 0)) >>> 0);
}

/** Is this the guest's page for `frame`, intact (whatever its version)? */
export function pageIsIntact(words: Uint32Array, frame: number, seed: number): boolean {
  if (words[0] !== MAGIC || words[1] !== frame || words[3] !== seed || words[7] !== 0) return false;
  if (words[6] !== checkWord(frame, words[2]!, seed, words[4]!, words[5]!)) return false;
  const base = mix((Math.imul(seed, 0x9e3779b9) ^ mix(frame)) >>> 0);
  for (let w = 8; w < PAGE / 4; w++) {
    if (words[w] !== ((base + Math.imul(w, 0x9e3779b9)) >>> 0)) return false;
  }
  return true;
}

/**
 * Was `dst` written after `src`? Versions only grow, and so does the TSC
 * stamp of each write (QEMU carries the TSC across a migration). A page the
 * guest rewrote at the destination with a version it had already written at
 * the source (its counters can lag after a TCG migration, see the README)
 * still has a later stamp; a stale copy never does.
 */
function isNewer(dst: Uint32Array, src: Uint32Array): boolean {
  if (dst[2] !== src[2]) return dst[2]! > src[2]!;
  return dst[5] !== src[5] ? dst[5]! > src[5]! : dst[4]! > src[4]!;
}

function pagesEqual(a: Uint8Array, b: Uint8Array, offset: number): boolean {
  return Buffer.compare(a.subarray(offset, offset + PAGE), b.subarray(offset, offset + PAGE)) === 0;
}

/** Word w of churn content `id` (test/guest/churn.c: content_word). */
function churnWord(id: number, w: number, seed: number): number {
  const salt = id <= 256 ? 0 : seed;
  if (w === 0) return id;
  if (w === 1) return salt;
  return mix((Math.imul(id, 0x9e3779b9) ^ salt ^ mix(w)) >>> 0);
}

function churnPageIs(words: Uint32Array, at: number, id: number, seed: number): boolean {
  for (let w = 0; w < PAGE / 4; w++) if (words[at + w] !== (id === 0 ? 0 : churnWord(id, w, seed))) return false;
  return true;
}

/**
 * A churn page, judged by both tables' entries (content id, version): same
 * version, the bytes must be the source's; a newer one at the destination,
 * the bytes must be that entry's content; an older one is a stale entry.
 */
function compareChurnPage(src: Uint32Array, dst: Uint32Array, offset: number, layout: GuestLayout): "identical" | "rewritten" | "wrong" {
  const p = (offset - layout.churnStart) / PAGE;
  const entry = layout.tableStart / 4 + 2 * p;
  const [idS, verS, idD, verD] = [src[entry]!, src[entry + 1]!, dst[entry]!, dst[entry + 1]!];
  const at = offset / 4;
  if (verD === verS) {
    if (idD !== idS) return "wrong";
    for (let w = 0; w < PAGE / 4; w++) if (src[at + w] !== dst[at + w]) return "wrong";
    return "identical";
  }
  return verD > verS && churnPageIs(dst, at, idD, layout.seed) ? "rewritten" : "wrong";
}

/** A VM's final page map as the scatter wrote it under SGM_TEST_MAP_DIR (core/test-faults.ts): pc.ram's digests. */
export interface FinalMap {
  /** Every page's content digest, over all RAM blocks. */
  digests: Uint8Array;
  /** The first page of pc.ram (guest-physical 0) among them, and its page count. */
  ramFirst: number;
  ramPages: number;
}

export function readFinalMap(mapDir: string, vmName: string): FinalMap {
  const digests = new Uint8Array(readFileSync(join(mapDir, `${vmName}.map`)));
  const { blocks } = JSON.parse(readFileSync(join(mapDir, `${vmName}.map.json`), "utf8")) as { blocks: Array<{ name: string; pages: number }> };
  const b = blocks.findIndex((block) => block.name === "pc.ram");
  if (b < 0) throw new Error(`the final map has no pc.ram block: ${blocks.map((block) => block.name).join(", ")}`);
  return { digests, ramFirst: blocks.slice(0, b).reduce((n, block) => n + block.pages, 0), ramPages: blocks[b]!.pages };
}

function mapDigest(map: FinalMap, frame: number): Uint8Array {
  const at = (map.ramFirst + frame) * DIGEST_BYTES;
  return map.digests.subarray(at, at + DIGEST_BYTES);
}

/**
 * Frames of guest RAM (pc.ram, guest-physical from 0 in a VM under 3 GiB;
 * outside the legacy VGA/BIOS window) whose bytes in `memory` do not have
 * the digest the final map names for that page.
 */
export function framesUnlikeMap(memory: Uint8Array, map: FinalMap): number[] {
  if (map.ramPages * PAGE !== memory.length) throw new Error(`pc.ram is ${map.ramPages} pages in the map, the dump ${memory.length / PAGE}`);
  const digest = new Uint8Array(DIGEST_BYTES);
  const differ: number[] = [];
  for (let offset = 0; offset < memory.length; offset += PAGE) {
    if (offset >= VGA_HOLE_START && offset < VGA_HOLE_END) continue;
    digestPage(memory.subarray(offset, offset + PAGE), digest);
    if (Buffer.compare(digest, mapDigest(map, offset / PAGE)) !== 0) differ.push(offset / PAGE);
  }
  return differ;
}

/** Does the final map name the zero page for this frame of pc.ram? */
export function mapsToZero(map: FinalMap, frame: number): boolean {
  return Buffer.compare(ZERO_PAGE_DIGEST, mapDigest(map, frame)) === 0;
}

/** Frames (outside the legacy VGA/BIOS window) whose bytes differ. */
export function compareExactly(source: Uint8Array, destination: Uint8Array): number[] {
  if (source.length !== destination.length) throw new Error(`dump sizes differ: ${source.length} vs ${destination.length}`);
  const differ: number[] = [];
  for (let offset = 0; offset < source.length; offset += PAGE) {
    if (offset >= VGA_HOLE_START && offset < VGA_HOLE_END) continue;
    if (!pagesEqual(source, destination, offset)) differ.push(offset / PAGE);
  }
  return differ;
}

export function compareGuestMemory(source: Uint8Array, destination: Uint8Array, layout: GuestLayout): MemoryComparison {
  if (source.length !== destination.length) throw new Error(`dump sizes differ: ${source.length} vs ${destination.length}`);
  const result: MemoryComparison = { pages: 0, identical: 0, rewrittenAfter: 0, finishedAfter: 0, churnRewrittenAfter: 0, mismatched: [] };
  const srcWords = new Uint32Array(source.buffer, source.byteOffset, source.length / 4);
  const dstWords = new Uint32Array(destination.buffer, destination.byteOffset, destination.length / 4);
  for (let offset = 0; offset < source.length; offset += PAGE) {
    // The legacy VGA/BIOS window is device space, and the guest's own stack
    // and counters legitimately differ between a stopped source and a halted
    // destination.
    if (offset >= VGA_HOLE_START && offset < VGA_HOLE_END) continue;
    if (offset >= layout.scratchStart && offset < layout.scratchEnd) continue;
    // the table is checked entry by entry with its pages
    if (offset >= layout.tableStart && offset < layout.tableEnd) continue;
    result.pages++;
    if (offset >= layout.churnStart && offset < layout.tableStart) {
      const verdict = compareChurnPage(srcWords, dstWords, offset, layout);
      if (verdict === "identical") result.identical++;
      else if (verdict === "rewritten") result.churnRewrittenAfter++;
      else result.mismatched.push(offset / PAGE);
      continue;
    }
    if (pagesEqual(source, destination, offset)) {
      result.identical++;
      continue;
    }
    const frame = offset / PAGE;
    const inData = offset >= layout.dataStart && offset < layout.dataEnd;
    if (inData) {
      const src = srcWords.subarray(offset / 4, offset / 4 + PAGE / 4);
      const dst = dstWords.subarray(offset / 4, offset / 4 + PAGE / 4);
      const dstIntact = pageIsIntact(dst, frame, layout.seed);
      const srcIntact = pageIsIntact(src, frame, layout.seed);
      if (dstIntact && srcIntact && isNewer(dst, src)) {
        result.rewrittenAfter++;
        continue;
      }
      // the header write the source was stopped in: the destination resumed it where it was
      const finished = [0, 1, 2, 3, 4, 5].every((w) => dst[w] === src[w]);
      if (dstIntact && !srcIntact && result.finishedAfter === 0 && src[0] === MAGIC && (finished || isNewer(dst, src))) {
        result.finishedAfter++;
        continue;
      }
    }
    result.mismatched.push(frame);
  }
  return result;
}
