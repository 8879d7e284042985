// The gather's fetches from relays, against a stand-in relay on a real
// loopback connection: every page a relay gives is checked against the
// digest asked for, whether the reply holds every page (hashed in one
// call) or lacks some (hashed a page at a time), and a relay that gives one
// wrong page is dropped.

import { afterEach, describe, expect, test } from "bun:test";
import { DIGEST_BYTES, PAGE_BYTES, digestPage } from "../core/dedup/digest.ts";
import { ContentDirectory } from "../core/gather/content-directory.ts";
import { RelayFetcher } from "../core/gather/relay-fetcher.ts";
import type { PeerConnection } from "../core/wire/connection.ts";
import { maxPayload } from "../core/wire/messages.ts";
import { type PeerListener, listenPeers } from "../core/wire/peer-listener.ts";
import { PagesBuilder, RELEASE_BATCH, RelayFrame, readDigestRequest, readRelease } from "../core/wire/relay-messages.ts";

const psk = new TextEncoder().encode("sgm fetcher test key 0123456789abcdef");
const closers: Array<() => void> = [];
afterEach(() => {
  for (const close of closers.splice(0)) close();
});

function pageOf(seed: number): { page: Uint8Array; digest: Uint8Array } {
  const page = new Uint8Array(PAGE_BYTES);
  const view = new DataView(page.buffer);
  for (let i = 0; i < PAGE_BYTES; i += 4) view.setUint32(i, Math.imul(seed + 1, 2654435761) ^ (i * 40503));
  const digest = new Uint8Array(DIGEST_BYTES);
  digestPage(page, digest);
  return { page, digest };
}

/** A relay stand-in on a real loopback listener: each frame a gather sends it goes to `onFrame`. */
function relayStandIn(onFrame: (conn: PeerConnection, type: number, payload: Uint8Array) => void): PeerListener {
  const listener = listenPeers({
    host: "127.0.0.1",
    port: 0,
    psk,
    role: "relay",
    acceptRoles: ["gather"],
    maxPayload,
    onConnection(conn) {
      closers.push(() => conn.close());
      conn.onFrame((type, payload) => onFrame(conn, type, payload));
    },
  });
  closers.push(() => listener.close());
  return listener;
}

/** A relay that answers every GET with `answer(n)` for the n-th digest asked: a page, or null for not held. */
function standInRelay(answer: (digest: Uint8Array) => Uint8Array | null): PeerListener {
  return relayStandIn((conn, type, payload) => {
    if (type !== RelayFrame.GET) return;
    const { req, count, digests } = readDigestRequest(payload, "GET");
    const reply = new PagesBuilder(req, count);
    for (let n = 0; n < count; n++) {
      const page = answer(digests.subarray(n * DIGEST_BYTES, (n + 1) * DIGEST_BYTES));
      const at = reply.addEntry(digests, n * DIGEST_BYTES, page !== null);
      if (page) reply.take().set(page, at);
    }
    conn.send(RelayFrame.PAGES, reply.take());
  });
}

async function fetchAll(relay: PeerListener, pages: Array<{ digest: Uint8Array }>) {
  const dir = new ContentDirectory(() => {});
  const lost: string[] = [];
  const unreachable: number[] = [];
  const arrived = new Set<number>();
  const everyone = Promise.withResolvers<void>();
  const fetcher = new RelayFetcher(dir, null, {
    error: (err) => everyone.reject(err),
    lost: (_address, reason) => {
      lost.push(reason);
      everyone.resolve();
    },
    unreachable: (cid) => unreachable.push(cid),
  });
  closers.push(() => fetcher.close());
  await fetcher.connect(new Uint8Array(16).fill(3), [`127.0.0.1:${relay.port}`], psk, null);
  const cids = pages.map((p) => {
    const cid = dir.intern(p.digest, 0);
    dir.locate(cid, 1);
    dir.need(cid);
    return cid;
  });
  dir.onLocal((cid) => {
    arrived.add(cid);
    if (arrived.size === cids.length) everyone.resolve();
  });
  for (const cid of cids) fetcher.want(cid, false);
  const timeout = setTimeout(() => everyone.reject(new Error(`neither all ${cids.length} pages nor the relay's loss within 10 s (${arrived.size} arrived)`)), 10_000);
  await everyone.promise.finally(() => clearTimeout(timeout));
  return { dir, cids, lost, unreachable, arrived };
}

describe("fetching pages from a relay", () => {
  const pages = Array.from({ length: 300 }, (_, n) => pageOf(n));
  const byDigest = new Map(pages.map((p) => [Buffer.from(p.digest).toString("hex"), p.page]));
  const held = (digest: Uint8Array) => byDigest.get(Buffer.from(digest).toString("hex")) ?? null;

  test("replies holding every page: each arrives with its own content", async () => {
    const { dir, cids, lost } = await fetchAll(standInRelay(held), pages);
    expect(lost).toEqual([]);
    cids.forEach((cid, n) => expect(Buffer.from(dir.data(cid)).equals(Buffer.from(pages[n]!.page))).toBe(true));
  });

  test.each([
    ["holds every page", (n: number) => n === 123],
    ["lacks some pages", (n: number) => n === 123 || n % 7 === 0],
  ])("a reply that %s with one page unlike its digest: the relay is dropped, that page never arrives, and every page that did is the one asked for", async (_what, odd) => {
    const wrong = pageOf(9999).page;
    const index = new Map(pages.map((p, n) => [Buffer.from(p.digest).toString("hex"), n]));
    const relay = standInRelay((digest) => {
      const n = index.get(Buffer.from(digest).toString("hex"))!;
      if (n === 123) return wrong;
      return odd(n) ? null : pages[n]!.page;
    });
    const { dir, cids, lost } = await fetchAll(relay, pages);
    expect(lost.length).toBe(1);
    expect(lost[0]).toContain("sent a page that does not match its digest");
    expect(dir.isLocal(cids[123]!)).toBe(false);
    for (const [n, cid] of cids.entries()) if (dir.isLocal(cid)) expect(Buffer.from(dir.data(cid)).equals(Buffer.from(pages[n]!.page))).toBe(true);
  });
});

describe("releasing content on relays", () => {
  test("each relay hears of what it held, in batches of at most RELEASE_BATCH; a relay a resumed gather could not reach is skipped", async () => {
    const released: string[] = [];
    const frames: number[] = [];
    const gotAll = Promise.withResolvers<void>();
    const count = RELEASE_BATCH + 904;
    const listener = relayStandIn((_conn, type, payload) => {
      if (type !== RelayFrame.RELEASE) return;
      const release = readRelease(payload);
      frames.push(release.count);
      for (let n = 0; n < release.count; n++) released.push(Buffer.from(release.digests.subarray(n * DIGEST_BYTES, (n + 1) * DIGEST_BYTES)).toString("hex"));
      if (released.length >= count) gotAll.resolve();
    });
    const dir = new ContentDirectory(() => {});
    const fetcher = new RelayFetcher(dir, null, { error: (err) => gotAll.reject(err), lost: () => {}, unreachable: () => {} });
    // relay 1 refuses the connection: a resumed gather goes on without it
    const gone = await fetcher.connect(new Uint8Array(16).fill(4), [`127.0.0.1:${listener.port}`, "127.0.0.1:1"], psk, null, true);
    expect(gone.map((g) => g.index)).toEqual([1]);
    const digests = Array.from({ length: count + 10 }, (_, n) => pageOf(50_000 + n).digest);
    const cids = digests.map((d) => dir.intern(d, 0));
    // every content on both relays, but the last ten on neither
    cids.forEach((cid, n) => fetcher.release(cid, n < count ? 0b11 : 0));
    fetcher.flushAllReleases();
    const timeout = setTimeout(() => gotAll.reject(new Error(`not all ${count} releases within 10 s (${released.length} came)`)), 10_000);
    await gotAll.promise.finally(() => clearTimeout(timeout));
    fetcher.close();
    expect(frames).toEqual([RELEASE_BATCH, 904]);
    expect(released).toEqual(digests.slice(0, count).map((d) => Buffer.from(d).toString("hex")));
  });
});
