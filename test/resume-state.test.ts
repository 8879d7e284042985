// The parts of --resume that need no QEMU: the saved state's file, and the
// return path of QEMU's postcopy recovery as QEMU writes it.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { DIGEST_BYTES, digestPage, PAGE_BYTES } from "../core/dedup/digest.ts";
import { ContentDirectory } from "../core/gather/content-directory.ts";
import { claimSavedState, snapshotFeedState } from "../core/gather/feed-state.ts";
import { finalMapDigest } from "../core/gather/final-checks.ts";
import { PageTable } from "../core/gather/page-table.ts";
import { StateKeeper } from "../core/gather/state-keeper.ts";
import { loadResumeState, resumeStatePath, type ResumeState, SAVED_ZERO, saveResumeState } from "../core/gather/resume-state.ts";
import { ReturnPath } from "../core/qemu/constants.ts";
import { RecoveryReader } from "../core/qemu/postcopy-recovery.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";

let dir: string;
beforeAll(() => {
  dir = makeTempDir("resume-state");
});
afterAll(() => removeDir(dir));

function sampleState(): ResumeState {
  const page = new Uint8Array(4096).fill(7);
  return {
    name: "vm1",
    blocks: [{ name: "pc.ram", usedLength: 4 * 4096 }],
    sectionId: 3,
    run: "00112233445566778899aabbccddeeff",
    relays: ["127.0.0.1:7701"],
    map: "ab".repeat(32),
    startedAt: 1_700_000_000_000,
    sourceQemu: "7.2.0",
    pages: Int32Array.from([0, SAVED_ZERO, 1, 0]),
    atDestination: Uint8Array.from([1, 0, 0, 0]),
    digests: new Uint8Array(64).map((_, i) => i),
    relayMasks: Uint32Array.from([1, 0]),
    localIndex: [1],
    localPages: [page],
  };
}

describe("saved state for --resume", () => {
  test("what is saved loads back the same, private to its owner", async () => {
    const path = join(dir, "a.resume");
    const state = sampleState();
    const bytes = await saveResumeState(path, state);
    expect(statSync(path).size).toBe(bytes);
    expect(statSync(path).mode & 0o777).toBe(0o600);
    expect(loadResumeState(path)).toEqual(state);
  });

  test("a truncated or foreign file is refused, naming the file", async () => {
    const path = join(dir, "b.resume");
    await saveResumeState(path, sampleState());
    const whole = readFileSync(path);
    writeFileSync(path, whole.subarray(0, whole.length - 1));
    expect(() => loadResumeState(path)).toThrow(/b\.resume: not a state sgm saved \(\d+ bytes where \d+ were expected\)/);
    writeFileSync(path, "hello");
    expect(() => loadResumeState(path)).toThrow(/not a state sgm saved \(no magic\)/);
    // one saved before the digests were BLAKE3's: its digests are SHA-256's, not to be read as these
    const earlier = Buffer.from(whole);
    earlier.write("SGMRSM01", 0, "latin1");
    writeFileSync(path, earlier);
    expect(() => loadResumeState(path)).toThrow(/b\.resume: saved by an earlier sgm, whose page digests were SHA-256: resume with that sgm/);
  });

  test("the pages a state names stay held until it is written, though delivered meanwhile, and load back", async () => {
    const blocks = [{ name: "pc.ram", usedLength: 3 * PAGE_BYTES }];
    const table = new PageTable(blocks);
    const contents = new ContentDirectory(() => {});
    const digest = new Uint8Array(DIGEST_BYTES);
    const cids = [1, 2, 3].map((fill, i) => {
      const page = new Uint8Array(PAGE_BYTES).fill(fill);
      digestPage(page, digest);
      const cid = contents.intern(digest, 0);
      contents.receive(cid, page);
      table.content[i] = cid;
      contents.need(cid);
      table.owing[i] = 1;
      // held for the page alone, not for the scatter
      contents.unpin(cid);
      return cid;
    });
    expect(cids.every((c) => contents.isLocal(c))).toBe(true);
    const path = join(dir, "held.resume");
    const lines: string[] = [];
    const keeper = new StateKeeper(path, "vm1", (line) => lines.push(line));
    const map = finalMapDigest("vm1", table, contents);
    keeper.save(() => snapshotFeedState({ name: "vm1", blocks, sectionId: 2, run: "00".repeat(16), relays: [], map, startedAt: null, sourceQemu: null }, table, contents));
    // the destination takes page 1 while the state is written: its bytes stay until the write ends
    table.owing[1] = 0;
    table.delivered[1] = 1;
    contents.unneed(cids[1]!);
    expect(contents.isLocal(cids[1]!)).toBe(true);
    // new content meanwhile takes a free slot, which page 1's would be without the hold
    const other = new Uint8Array(PAGE_BYTES).fill(9);
    digestPage(other, digest);
    contents.receive(contents.intern(digest, 0), other);
    await keeper.saved;
    expect(lines.join("\n")).toMatch(/state for --resume saved/);
    expect(contents.isLocal(cids[1]!)).toBe(false);
    expect(contents.isLocal(cids[0]!)).toBe(true);
    const fresh = new ContentDirectory(() => {});
    const restored = new PageTable(blocks);
    claimSavedState(loadResumeState(path), restored, fresh);
    expect([0, 1, 2].map((i) => fresh.data(restored.content[i]!)[0])).toEqual([1, 2, 3]);
  });

  test("each destination QEMU has a file of its own", () => {
    expect(resumeStatePath("/s", "vm1", "/a/vm1.qmp")).not.toBe(resumeStatePath("/s", "vm1", "/b/vm1.qmp"));
    expect(resumeStatePath("/s", "../x", "/a.qmp")).toMatch(/^\/s\/\.\._x-[0-9a-f]{12}\.resume$/);
  });
});

/** What QEMU's ramblock_recv_bitmap_send and migrate_send_rp_resume_ack write. */
function qemuReplies(blocks: Array<{ name: string; received: number[]; pages: number }>): Uint8Array {
  const parts: number[] = [];
  const be16 = (v: number) => parts.push(v >> 8, v & 0xff);
  const be64 = (v: bigint) => {
    for (let k = 7; k >= 0; k--) parts.push(Number((v >> BigInt(8 * k)) & 0xffn));
  };
  for (const b of blocks) {
    const name = new TextEncoder().encode(b.name);
    be16(ReturnPath.RECV_BITMAP);
    be16(name.length + 1);
    parts.push(name.length, ...name);
    const size = Math.ceil(Math.ceil(b.pages / 8) / 8) * 8;
    const bits = new Uint8Array(size);
    for (const p of b.received) bits[p >> 3]! |= 1 << (p & 7);
    be64(BigInt(size));
    parts.push(...bits);
    be64(0x0123456789abcdefn);
  }
  be16(ReturnPath.RESUME_ACK);
  be16(4);
  parts.push(0, 0, 0, 1);
  // a page request right behind the ack
  parts.push(0, ReturnPath.REQ_PAGES, 0, 12, ...new Array(12).fill(9));
  return Uint8Array.from(parts);
}

describe("postcopy recovery's return path", () => {
  test("bitmaps and the ack, a byte at a time; what follows the ack is handed back", async () => {
    const bytes = qemuReplies([
      { name: "pc.ram", received: [0, 9, 70], pages: 100 },
      { name: "vga.vram", received: [], pages: 3 },
    ]);
    const reader = new RecoveryReader([
      { name: "pc.ram", pages: 100 },
      { name: "vga.vram", pages: 3 },
    ]);
    for (let i = 0; i < bytes.length; i++) reader.feed(bytes.subarray(i, i + 1));
    const bitmaps = await reader.bitmapsIn;
    const ram = bitmaps.get("pc.ram")!;
    expect([...Array(100).keys()].filter((p) => ram.has(p))).toEqual([0, 9, 70]);
    expect(bitmaps.get("vga.vram")!.has(0)).toBe(false);
    await reader.acked;
    const after: number[] = [];
    reader.handOver((data) => after.push(...data));
    reader.feed(Uint8Array.from([5]));
    expect(after.length).toBe(17);
  });

  test("a bitmap for another block, a missing end mark or a bad ack is refused", () => {
    const good = qemuReplies([{ name: "pc.ram", received: [1], pages: 64 }]);
    expect(() => new RecoveryReader([{ name: "other", pages: 64 }]).feed(good)).toThrow(/bitmap of block 'pc.ram' came where 'other' was due/);
    const noMark = good.slice();
    noMark[4 + 7 + 8 + 8 + 7] = 0xee;
    expect(() => new RecoveryReader([{ name: "pc.ram", pages: 64 }]).feed(noMark)).toThrow(/lacks its end mark/);
    const badAck = good.slice();
    badAck[4 + 7 + 8 + 8 + 8 + 7] = 2;
    expect(() => new RecoveryReader([{ name: "pc.ram", pages: 64 }]).feed(badAck)).toThrow(/RESUME_ACK 2/);
    expect(() => new RecoveryReader([{ name: "pc.ram", pages: 8 }]).feed(qemuReplies([{ name: "pc.ram", received: [], pages: 4096 }]))).toThrow(/a bitmap of 512 bytes for block 'pc.ram', not 8/);
  });
});
