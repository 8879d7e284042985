// The scatter's frames to the gather, in the order the wire carries them:
// no PAGE_MAP entry names content before a PAGE_DATA frame has carried its
// bytes or a LOCATIONS frame has said which relay holds them. The gather
// refuses a map naming content it was never told of, and in postcopy that
// fails a VM already running at its destination.

import { afterAll, afterEach, describe, expect, test } from "bun:test";
import { PAGE_BYTES, digestHex } from "../core/dedup/digest.ts";
import { DigestPool } from "../core/dedup/digest-pool.ts";
import { PagePipeline } from "../core/scatter/page-pipeline.ts";
import { RunPlacement } from "../core/scatter/placement.ts";
import { startRelay } from "../core/relay/engine.ts";
import { SgmError } from "../core/errors.ts";
import { PeerConnection } from "../core/wire/connection.ts";
import { ENTRY_PENDING, FrameType, maxPayload, readLocations, readPageData, readPageMap } from "../core/wire/messages.ts";
import { listenPeers } from "../core/wire/peer-listener.ts";

const psk = new TextEncoder().encode("map order test key 0123456789abcdef");
const pool = new DigestPool(1);
afterAll(() => pool.close());
const closers: Array<() => void> = [];
afterEach(() => {
  for (const close of closers.splice(0)) close();
});

function pageOf(seed: number): Uint8Array {
  const page = new Uint8Array(PAGE_BYTES);
  const view = new DataView(page.buffer);
  for (let i = 0; i < PAGE_BYTES; i += 4) view.setUint32(i, Math.imul(seed + 1, 2654435761) ^ (i * 40503));
  return page;
}

/**
 * A gather's end of the connection that keeps the rule: what each frame
 * tells it of content, in order; `named` resolves once `entries` map
 * entries naming content have come.
 */
async function connectToOrderChecker(entries: number): Promise<{ conn: PeerConnection; named: Promise<string[]> }> {
  const told = new Set<string>();
  const unknown: string[] = [];
  let seen = 0;
  const done = Promise.withResolvers<string[]>();
  const listener = listenPeers({
    host: "127.0.0.1",
    port: 0,
    psk,
    role: "gather",
    acceptRoles: ["scatter"],
    maxPayload,
    onConnection(conn) {
      closers.push(() => conn.close());
      conn.onFrame((type, payload) => {
        if (type === FrameType.PAGE_DATA) readPageData(payload, (digestAt) => told.add(digestHex(payload, digestAt)));
        if (type === FrameType.LOCATIONS) readLocations(payload, (digestAt) => told.add(digestHex(payload, digestAt)));
        if (type !== FrameType.PAGE_MAP) return;
        readPageMap(payload, (_vm, block, page, digestAt) => {
          if (digestAt < 0 || digestAt === ENTRY_PENDING) return;
          if (!told.has(digestHex(payload, digestAt))) unknown.push(`page ${block}:${page}`);
          if (++seen === entries) done.resolve(unknown);
        });
      });
    },
  });
  closers.push(() => listener.close());
  const conn = await PeerConnection.connect({ host: "127.0.0.1", port: listener.port, psk, role: "scatter", expectRole: "gather", maxPayload, timeoutMs: 5000 });
  closers.push(() => conn.close());
  return { conn, named: done.promise };
}

describe("the scatter's frames to the gather", () => {
  test.each([false, true])("a page the destination waits for, whose content is still being batched for the gather, goes after those bytes (digest thread: %p)", async (threads) => {
    const { conn, named } = await connectToOrderChecker(3);
    const placement = new RunPlacement(conn, 1);
    const pipeline = new PagePipeline(0, placement, threads ? pool : null);
    pipeline.setBlocks([{ name: "pc.ram", usedLength: 16 * PAGE_BYTES }]);
    // new content, placed for the gather in a PAGE_DATA frame not yet full
    pipeline.page(0, 1, pageOf(1));
    // the destination asks for another page of the same content: a reference to it goes at once
    pipeline.urgent(0, 2, pageOf(1));
    pipeline.flush();
    // and a page of its own, as a postcopy source sends the rest
    pipeline.page(0, 3, pageOf(3));
    pipeline.flush();
    expect(await named).toEqual([]);
    pipeline.close();
  });

  test("a page being batched for a relay whose connection has just closed goes after its bytes, placed elsewhere", async () => {
    // 256 pages fill the gather's direct window (the stand-in never says it took them), the last goes to the relay
    const direct = 256;
    const { conn, named } = await connectToOrderChecker(direct + 1);
    const relay = startRelay({ host: "127.0.0.1", port: 0, psk, capacityBytes: 64 << 20, ttlMs: 60_000 });
    closers.push(() => void relay.close());
    const relayConn = await PeerConnection.connect({ host: "127.0.0.1", port: relay.port, psk, role: "scatter", expectRole: "relay", maxPayload, timeoutMs: 5000 });
    closers.push(() => relayConn.close());
    const placement = new RunPlacement(conn, 1);
    placement.neededWhile(() => true);
    placement.addRelay(`127.0.0.1:${relay.port}`, relayConn, crypto.getRandomValues(new Uint8Array(16)), 64 << 20);
    const pipeline = new PagePipeline(0, placement);
    pipeline.setBlocks([{ name: "pc.ram", usedLength: (direct + 1) * PAGE_BYTES }]);
    for (let n = 0; n < direct; n++) pipeline.page(0, n, pageOf(n));
    pipeline.flush();
    pipeline.page(0, direct, pageOf(direct));
    pipeline.settle();
    expect(placement.relays[0]!.pagesPut).toBe(1);
    // the connection ends before the batch leaves; the map frame is cut in the same turn, before the relay counts as lost
    relayConn.abort(new SgmError("unavailable", "relay connection reset"));
    pipeline.flush();
    expect(await named).toEqual([]);
    expect(placement.relays[0]!.lostReason).not.toBeNull();
    pipeline.close();
  });
});
