// The wire: frame codec, pre-shared-key authentication, and authenticated
// framed connections over real loopback sockets.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Socket } from "bun";
import { closeSync, mkdirSync, openSync, writeFileSync } from "node:fs";
import { SgmError } from "../core/errors.ts";
import { ClientHandshake, loadPsk, type Role } from "../core/wire/auth.ts";
import { PeerConnection, type TlsFiles } from "../core/wire/connection.ts";
import { listenPeers, type ListenOptions, type PeerListener } from "../core/wire/peer-listener.ts";
import { FrameDecoder, WIRE_VERSION, encodeFrameHeader, frame, type MaxPayload } from "../core/wire/frames.ts";
import { LocationList, readLocations } from "../core/wire/messages.ts";
import { bytesReceivedNatively, nativeReceive, receiveWaiting, socketFd } from "../core/net/socket-receive.ts";
import { bytesSentNatively, NativeSender, nativeSend } from "../core/net/socket-send.ts";
import { makeTestCertificates } from "./harness/certificates.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";

const HOST = "127.0.0.1";
const DATA = 16;
const BIG = 17;
const bounds: MaxPayload = (type) => (type === DATA ? 1 << 20 : type === BIG ? 300 << 10 : undefined);

let dir: string;
let psk: Uint8Array;
let otherPsk: Uint8Array;
beforeAll(() => {
  dir = makeTempDir("wire");
  psk = new TextEncoder().encode("correct horse battery staple");
  otherPsk = new TextEncoder().encode("incorrect horse battery staple");
});
afterAll(() => removeDir(dir));

interface Decoded {
  type: number;
  payload: Uint8Array;
}

function collectingDecoder(out: Decoded[], maxPayload: MaxPayload = bounds): FrameDecoder {
  return new FrameDecoder(maxPayload, (type, payload) => out.push({ type, payload: payload.slice() }));
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function pattern(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = (i * 31 + seed * 7) & 0xff;
  return out;
}

function header(version: number, type: number, flags: number, length: number): Uint8Array {
  const h = new Uint8Array(8);
  const v = new DataView(h.buffer);
  v.setUint8(0, version);
  v.setUint8(1, type);
  v.setUint16(2, flags);
  v.setUint32(4, length);
  return h;
}

function dataError(fn: () => void): SgmError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(SgmError);
    expect((err as SgmError).kind).toBe("data");
    return err as SgmError;
  }
  throw new Error("expected an error");
}

describe("frame codec", () => {
  const sizes = [0, 1, 7, 8, 9, 100, 1000, 0, 3];
  const frames: Decoded[] = sizes.map((size, i) => ({ type: i % 2 === 0 ? DATA : BIG, payload: pattern(size, i) }));
  const stream = concat(frames.map((f) => frame(f.type, f.payload)));

  test("frames split at every byte boundary decode identically", () => {
    for (let cut = 0; cut <= stream.length; cut++) {
      const out: Decoded[] = [];
      const decoder = collectingDecoder(out);
      decoder.feed(stream.subarray(0, cut));
      decoder.feed(stream.subarray(cut));
      expect(out).toEqual(frames);
      expect(decoder.midFrame).toBe(false);
    }
  });

  test("frames fed one byte at a time, and two cuts at every pair of boundaries, decode identically", () => {
    const out: Decoded[] = [];
    const decoder = collectingDecoder(out);
    for (let i = 0; i < stream.length; i++) decoder.feed(stream.subarray(i, i + 1));
    expect(out).toEqual(frames);
    for (let a = 0; a <= stream.length; a += 3) {
      for (let b = a; b <= stream.length; b += 5) {
        const got: Decoded[] = [];
        const d = collectingDecoder(got);
        d.feed(stream.subarray(0, a));
        d.feed(stream.subarray(a, b));
        d.feed(stream.subarray(b));
        expect(got).toEqual(frames);
      }
    }
  });

  test("a frame spanning three chunks, between frames that do not", () => {
    const big = pattern(200_000, 5);
    const bytes = concat([frame(DATA, pattern(10, 1)), frame(BIG, big), frame(DATA, pattern(20, 2))]);
    const out: Decoded[] = [];
    const decoder = collectingDecoder(out);
    const first = 18 + 8 + 50_000;
    const second = first + 100_000;
    decoder.feed(bytes.subarray(0, first));
    expect(out.length).toBe(1);
    expect(decoder.midFrame).toBe(true);
    decoder.feed(bytes.subarray(first, second));
    expect(out.length).toBe(1);
    decoder.feed(bytes.subarray(second));
    expect(out).toEqual([
      { type: DATA, payload: pattern(10, 1) },
      { type: BIG, payload: big },
      { type: DATA, payload: pattern(20, 2) },
    ]);
  });

  test("a payload inside one chunk is passed as a view of that chunk, not a copy", () => {
    const bytes = frame(DATA, pattern(64, 3));
    let seen: Uint8Array | undefined;
    new FrameDecoder(bounds, (_type, payload) => (seen = payload)).feed(bytes);
    expect(seen?.buffer).toBe(bytes.buffer);
    expect(seen?.byteOffset).toBe(8);
  });

  test.each([
    ["an older peer's version", header(1, DATA, 0, 4), "frame with protocol version 1 (expected 2), type 16, length 4: the peer runs an earlier sgm; put the same sgm on every host"],
    ["nonzero flags", header(WIRE_VERSION, DATA, 0x8001, 4), "frame type 16 has flags 0x8001 (expected 0), length 4"],
    ["unknown type", header(WIRE_VERSION, 99, 0, 4), "unknown frame type 99, length 4"],
    ["oversize length", header(WIRE_VERSION, DATA, 0, (1 << 20) + 1), "frame type 16 length 1048577 exceeds its bound of 1048576 bytes"],
    ["a 4 GiB claim", header(WIRE_VERSION, BIG, 0, 0xffffffff), "frame type 17 length 4294967295 exceeds its bound of 307200 bytes"],
  ])("%s is a one-line data error, and the decoder stays failed", (_name, bad, message) => {
    const out: Decoded[] = [];
    const decoder = collectingDecoder(out);
    const err = dataError(() => decoder.feed(concat([frame(DATA, pattern(5, 0)), bad])));
    expect(err.message).toBe(message);
    expect(out.length).toBe(1); // the good frame before it was delivered
    expect(dataError(() => decoder.feed(frame(DATA, pattern(5, 0)))).message).toBe(message);
    expect(out.length).toBe(1);

    // The same header split across chunks fails as soon as it is whole.
    const split = collectingDecoder([]);
    split.feed(bad.subarray(0, 3));
    expect(dataError(() => split.feed(bad.subarray(3))).message).toBe(message);
  });

  test("bounds can be raised between frames (as after authentication)", () => {
    const out: Decoded[] = [];
    const decoder = new FrameDecoder(
      (type) => (type === 1 ? 16 : undefined),
      (type, payload) => {
        out.push({ type, payload: payload.slice() });
        decoder.setMaxPayload((t) => (t === DATA ? 1000 : undefined));
      },
    );
    decoder.feed(concat([frame(1, pattern(16, 0)), frame(DATA, pattern(1000, 1))]));
    expect(out.map((f) => f.type)).toEqual([1, DATA]);
  });

  test("encodeFrameHeader writes at an offset", () => {
    const out = new Uint8Array(12);
    encodeFrameHeader(200, 0x01020304, out, 4);
    expect([...out]).toEqual([0, 0, 0, 0, WIRE_VERSION, 200, 0, 0, 1, 2, 3, 4]);
  });
});

// ---- connections ----

interface Server {
  listener: PeerListener;
  connections: PeerConnection[];
  rejected: { address: string; err: SgmError }[];
  nextConnection(): Promise<PeerConnection>;
  nextRejection(): Promise<{ address: string; err: SgmError }>;
}

function startServer(role: Role, acceptRoles: Role[], extra: Partial<ListenOptions> = {}): Server {
  const connections: PeerConnection[] = [];
  const rejected: { address: string; err: SgmError }[] = [];
  let connWaiters: ((c: PeerConnection) => void)[] = [];
  let rejWaiters: ((r: { address: string; err: SgmError }) => void)[] = [];
  const listener = listenPeers({
    host: HOST,
    port: 0,
    psk,
    role,
    acceptRoles,
    maxPayload: bounds,
    onConnection(conn) {
      connections.push(conn);
      const w = connWaiters;
      connWaiters = [];
      for (const f of w) f(conn);
    },
    onRejected(address, err) {
      rejected.push({ address, err });
      const w = rejWaiters;
      rejWaiters = [];
      for (const f of w) f({ address, err });
    },
    ...extra,
  });
  return {
    listener,
    connections,
    rejected,
    nextConnection: () => new Promise((resolve) => connWaiters.push(resolve)),
    nextRejection: () => new Promise((resolve) => rejWaiters.push(resolve)),
  };
}

function connect(port: number, role: Role, options: { key?: Uint8Array; expectRole?: Role; tls?: TlsFiles } = {}): Promise<PeerConnection> {
  return PeerConnection.connect({
    host: HOST,
    port,
    psk: options.key ?? psk,
    tls: options.tls,
    role,
    expectRole: options.expectRole,
    maxPayload: bounds,
    timeoutMs: 5000,
  });
}

async function rejection(promise: Promise<unknown>): Promise<SgmError> {
  try {
    await promise;
  } catch (err) {
    expect(err).toBeInstanceOf(SgmError);
    return err as SgmError;
  }
  throw new Error("expected a rejection");
}

function nextFrame(conn: PeerConnection): Promise<Decoded> {
  return new Promise((resolve) => conn.onFrame((type, payload) => resolve({ type, payload: payload.slice() })));
}

interface RawPeer {
  socket: Socket<undefined>;
  closed: Promise<void>;
}

/** A plain socket that says what it is told to, for peers that misbehave. */
async function rawPeer(port: number, send?: Uint8Array, onData: (chunk: Uint8Array) => void = () => {}): Promise<RawPeer> {
  let onClosed!: () => void;
  const closed = new Promise<void>((resolve) => (onClosed = resolve));
  const socket = await Bun.connect({
    hostname: HOST,
    port,
    socket: { binaryType: "uint8array", data: (_s, chunk: Uint8Array) => onData(chunk), close: () => onClosed() },
  });
  if (send) socket.write(send);
  return { socket, closed };
}

/** A plain socket that authenticates as a scatter, then lets the test write raw bytes. */
async function rawAuthenticatedPeer(port: number): Promise<RawPeer> {
  const handshake = new ClientHandshake(psk, "scatter", "server");
  let authenticated!: () => void;
  const welcome = new Promise<void>((resolve) => (authenticated = resolve));
  const decoder = new FrameDecoder(
    () => 256,
    (type, payload) => {
      const step = handshake.receive(type, payload);
      for (const f of step.send) peer.socket.write(frame(f.type, f.payload));
      if (step.state === "done") authenticated();
    },
  );
  const hello = handshake.hello();
  const peer = await rawPeer(port, frame(hello.type, hello.payload), (chunk) => decoder.feed(chunk));
  await welcome;
  return peer;
}

describe("LOCATIONS payloads", () => {
  const digestsFrom = (count: number): Uint8Array => Uint8Array.from({ length: count * 32 + 3 }, (_, i) => Math.imul(i + 7, 2654435761) >>> 24);

  test("every entry read back in order, its digest and mask, 16384 a frame; the list empty after", () => {
    const count = 40_000;
    const source = digestsFrom(count);
    const masks = Array.from({ length: count }, (_, n) => [1, 0x80000000, 0xffffffff, 0x01020304][n % 4]!);
    const list = new LocationList();
    for (let n = 0; n < count; n++) list.add(source, 3 + n * 32, masks[n]!);
    expect(list.length).toBe(count);
    const payloads = list.take();
    expect(payloads.map((p) => (p.length - 4) / 36)).toEqual([16384, 16384, count - 2 * 16384]);
    let n = 0;
    for (const payload of payloads) {
      readLocations(payload, (digestAt, mask) => {
        expect(Buffer.from(payload.subarray(digestAt, digestAt + 32)).equals(source.subarray(3 + n * 32, 3 + (n + 1) * 32))).toBe(true);
        expect(mask >>> 0).toBe(masks[n]!);
        n++;
      });
    }
    expect(n).toBe(count);
    expect(list.length).toBe(0);
    expect(list.take()).toEqual([]);
  });
});

describe("TLS under the PSK proof", () => {
  let files: (name: "a" | "b" | "rogue", ca?: string) => Promise<TlsFiles>;
  beforeAll(async () => {
    const certs = await makeTestCertificates(dir);
    files = async (name, ca = certs.ca) => {
      const { cert, key } = certs.peer(name);
      return { cert: await Bun.file(cert).text(), key: await Bun.file(key).text(), ca: await Bun.file(ca).text() };
    };
  });

  test("both sides with certificates of the CA: authenticated, and frames flow both ways", async () => {
    const server = startServer("gather", ["scatter"], { tls: await files("a") });
    const accepted = server.nextConnection();
    const client = await connect(server.listener.port, "scatter", { tls: await files("b") });
    const conn = await accepted;
    const atServer = nextFrame(conn);
    client.send(DATA, pattern(200_000, 1));
    expect(await atServer).toEqual({ type: DATA, payload: pattern(200_000, 1) });
    const atClient = nextFrame(client);
    conn.send(DATA, pattern(10, 2));
    expect(await atClient).toEqual({ type: DATA, payload: pattern(10, 2) });
    client.close();
    server.listener.close();
  });

  test("a TLS socket is never read or written past Bun's socket: 64 MiB arrive intact", async () => {
    const server = startServer("gather", ["scatter"], { tls: await files("a") });
    const accepted = server.nextConnection();
    const client = await connect(server.listener.port, "scatter", { tls: await files("b") });
    const conn = await accepted;
    const nativeBefore = bytesReceivedNatively();
    const sentNativelyBefore = bytesSentNatively();
    const FRAMES = 256;
    const received = new Bun.CryptoHasher("sha256");
    let count = 0;
    const all = new Promise<void>((resolve) =>
      conn.onFrame((_type, payload) => {
        received.update(payload);
        if (++count === FRAMES) resolve();
      }),
    );
    const sent = new Bun.CryptoHasher("sha256");
    for (let i = 0; i < FRAMES; i++) {
      await client.whenWritable(4 << 20);
      const payload = pattern(256 << 10, i);
      sent.update(payload);
      client.send(DATA, payload);
    }
    await all;
    expect(received.digest("hex")).toBe(sent.digest("hex"));
    expect(bytesReceivedNatively()).toBe(nativeBefore);
    expect(bytesSentNatively()).toBe(sentNativelyBefore);
    client.close();
    server.listener.close();
  });

  test("a client whose certificate the CA did not sign is refused, and says why", async () => {
    const server = startServer("gather", ["scatter"], { tls: await files("a") });
    const rejected = server.nextRejection();
    const err = await rejection(connect(server.listener.port, "scatter", { tls: await files("rogue") }));
    expect(err.kind).toBe("unavailable");
    const atServer = await rejected;
    expect(atServer.err.message).toMatch(/TLS refused: .*SELF_SIGNED/);
    expect(server.connections.length).toBe(0);
    server.listener.close();
  });

  test("a server whose certificate the client's CA did not sign is refused by the client", async () => {
    const server = startServer("gather", ["scatter"], { tls: await files("rogue") });
    const err = await rejection(connect(server.listener.port, "scatter", { tls: await files("b") }));
    expect(err.message).toMatch(/TLS refused: .*SELF_SIGNED/);
    server.listener.close();
  });

  test("a client without TLS gets nowhere with a TLS server", async () => {
    const server = startServer("gather", ["scatter"], { tls: await files("a"), handshakeTimeoutMs: 500 });
    const err = await rejection(connect(server.listener.port, "scatter"));
    expect(err.kind).toBe("unavailable");
    expect(server.connections.length).toBe(0);
    server.listener.close();
  });
});

describe("authentication", () => {
  test("scatter to gather: both sides learn the other's role and exchange frames", async () => {
    const server = startServer("gather", ["scatter"]);
    const accepted = server.nextConnection();
    const client = await connect(server.listener.port, "scatter", { expectRole: "gather" });
    const conn = await accepted;
    expect(client.peerRole).toBe("gather");
    expect(conn.peerRole).toBe("scatter");
    expect(client.remoteAddress).toBe(`${HOST}:${server.listener.port}`);
    expect(conn.remoteAddress).toMatch(/^127\.0\.0\.1:\d+$/);

    const atServer = nextFrame(conn);
    client.send(DATA, pattern(100, 1));
    expect(await atServer).toEqual({ type: DATA, payload: pattern(100, 1) });
    const atClient = nextFrame(client);
    conn.sendParts(BIG, [pattern(3, 1), pattern(100_000, 2), new Uint8Array(0), pattern(5, 3)]);
    expect(await atClient).toEqual({ type: BIG, payload: concat([pattern(3, 1), pattern(100_000, 2), pattern(5, 3)]) });
    expect(client.bytesSent).toBe(108);
    expect(conn.bytesReceived).toBe(108);
    expect(conn.bytesSent).toBe(100_016);

    client.close();
    expect(await client.closed).toBeUndefined();
    expect(await conn.closed).toBeUndefined();
    server.listener.close();
    expect(server.rejected).toEqual([]);
  });

  test("gather to relay", async () => {
    const server = startServer("relay", ["scatter", "gather"]);
    const accepted = server.nextConnection();
    const client = await connect(server.listener.port, "gather", { expectRole: "relay" });
    expect(client.peerRole).toBe("relay");
    const conn = await accepted;
    expect(conn.peerRole).toBe("gather");
    // Closing the listener leaves authenticated connections alone.
    server.listener.close();
    const atClient = nextFrame(client);
    conn.send(DATA, pattern(10, 4));
    expect(await atClient).toEqual({ type: DATA, payload: pattern(10, 4) });
    client.close();
    expect(await client.closed).toBeUndefined();
    expect(await conn.closed).toBeUndefined();
  });

  test("a wrong key fails on both sides, and the server keeps accepting others", async () => {
    const server = startServer("gather", ["scatter"]);
    const port = server.listener.port;
    const rejected = server.nextRejection();
    const err = await rejection(connect(port, "scatter", { key: otherPsk }));
    expect(err.kind).toBe("unavailable");
    expect(err.message).toBe(`${HOST}:${port}: authentication failed (pre-shared keys differ?)`);
    const atServer = await rejected;
    expect(atServer.err.kind).toBe("unavailable");
    expect(atServer.err.message).toBe(`${atServer.address}: authentication failed, the peer says: pre-shared keys differ`);

    const accepted = server.nextConnection();
    const good = await connect(port, "scatter");
    await accepted;
    expect(server.connections.length).toBe(1);
    good.close();
    server.listener.close();
  });

  test("a server with another key is caught by the client before it proves anything", async () => {
    const server = startServer("relay", ["gather"], { psk: otherPsk });
    const rejected = server.nextRejection();
    const err = await rejection(connect(server.listener.port, "gather"));
    expect(err.message).toEndWith("authentication failed (pre-shared keys differ?)");
    expect((await rejected).err.message).toEndWith("authentication failed, the peer says: pre-shared keys differ");
    server.listener.close();
  });

  test("a role the server does not accept is refused, naming the role", async () => {
    const server = startServer("gather", ["scatter"]);
    const rejected = server.nextRejection();
    const err = await rejection(connect(server.listener.port, "relay"));
    expect(err.kind).toBe("unavailable");
    expect(err.message).toBe(
      `${HOST}:${server.listener.port}: authentication failed, the peer says: a gather does not accept a relay (accepts: scatter)`,
    );
    const atServer = await rejected;
    expect(atServer.err.message).toBe(`${atServer.address}: authentication failed: a gather does not accept a relay (accepts: scatter)`);
    server.listener.close();
  });

  test("a client that expects another role than the server's gives up", async () => {
    const server = startServer("relay", ["scatter"]);
    const rejected = server.nextRejection();
    const err = await rejection(connect(server.listener.port, "scatter", { expectRole: "gather" }));
    expect(err.message).toBe(`${HOST}:${server.listener.port}: authentication failed: the peer is a relay, expected a gather`);
    expect((await rejected).err.message).toEndWith("the peer says: a scatter expected a gather, not a relay");
    server.listener.close();
  });

  test("a peer sending garbage instead of HELLO is dropped", async () => {
    const server = startServer("gather", ["scatter"]);
    const rejected = server.nextRejection();
    const peer = await rawPeer(server.listener.port, new TextEncoder().encode("GET / HTTP/1.1\r\n\r\n"));
    const { address, err } = await rejected;
    expect(err.kind).toBe("data");
    expect(err.message).toBe(`${address}: frame with protocol version 71 (expected 2), type 69, length 790644820`);
    await peer.closed;
    server.listener.close();
  });

  test("a peer sending a frame other than HELLO first is dropped", async () => {
    const server = startServer("gather", ["scatter"]);
    const rejected = server.nextRejection();
    const peer = await rawPeer(server.listener.port, frame(3, new Uint8Array(32)));
    expect((await rejected).err.message).toEndWith("authentication failed: expected a HELLO frame of 33 bytes, got type 3 of 32 bytes");
    await peer.closed;
    server.listener.close();
  });

  test("a peer that sends nothing is dropped after the handshake timeout", async () => {
    const server = startServer("gather", ["scatter"], { handshakeTimeoutMs: 200 });
    const rejected = server.nextRejection();
    const started = performance.now();
    const peer = await rawPeer(server.listener.port);
    const { address, err } = await rejected;
    expect(err.message).toBe(`${address}: authentication timed out after 200 ms`);
    expect(performance.now() - started).toBeGreaterThanOrEqual(190);
    await peer.closed;
    server.listener.close();
  });

  test("peers that never authenticate hold a bounded number of sockets: past it, more from their host are dropped at once, and others still get in", async () => {
    const server = startServer("gather", ["scatter"], { maxAuthenticating: 4, maxAuthenticatingPerHost: 2 });
    const silent = [await rawPeer(server.listener.port), await rawPeer(server.listener.port)];
    const rejected = server.nextRejection();
    const third = await rawPeer(server.listener.port);
    const { address, err } = await rejected;
    expect(err.message).toBe(`${address}: dropped: 2 peers from 127.0.0.1 are authenticating already`);
    await third.closed;
    // one of the silent peers goes: its slot is free again, and a peer that authenticates gets in
    const freed = server.nextRejection();
    silent[0]!.socket.end();
    expect((await freed).err.message).toMatch(/closed during authentication/);
    const accepted = server.nextConnection();
    const good = await connect(server.listener.port, "scatter");
    await accepted;
    good.close();
    silent[1]!.socket.end();
    server.listener.close();
  });

  test("and a bounded number in all, whatever their hosts", async () => {
    const server = startServer("gather", ["scatter"], { maxAuthenticating: 2, maxAuthenticatingPerHost: 10 });
    const silent = [await rawPeer(server.listener.port), await rawPeer(server.listener.port)];
    const rejected = server.nextRejection();
    await rawPeer(server.listener.port);
    const { address, err } = await rejected;
    expect(err.message).toBe(`${address}: dropped: 2 peers are authenticating already`);
    for (const peer of silent) peer.socket.end();
    server.listener.close();
  });

  test("a client gives up on a server that never answers", async () => {
    const silent = Bun.listen({ hostname: HOST, port: 0, socket: { data() {} } });
    const err = await rejection(
      PeerConnection.connect({ host: HOST, port: silent.port, psk, role: "scatter", maxPayload: bounds, timeoutMs: 200 }),
    );
    expect(err.message).toBe(`${HOST}:${silent.port}: authentication timed out after 200 ms`);
    silent.stop(true);
  });

  test("connection refused is unavailable", async () => {
    const probe = Bun.listen({ hostname: HOST, port: 0, socket: { data() {} } });
    const port = probe.port;
    probe.stop(true);
    const err = await rejection(connect(port, "scatter"));
    expect(err.kind).toBe("unavailable");
    expect(err.message).toBe(`${HOST}:${port}: connection refused`);
  });

  test("an unknown host name is unavailable", async () => {
    const err = await rejection(
      PeerConnection.connect({ host: "no-such-host.invalid", port: 4000, psk, role: "scatter", maxPayload: bounds, timeoutMs: 3000 }),
    );
    expect(err.kind).toBe("unavailable");
    expect(err.message).toStartWith("no-such-host.invalid:4000: ");
  });

  test("loadPsk reads a key and reports bad key files", () => {
    mkdirSync(`${dir}/keys`, { recursive: true });
    writeFileSync(`${dir}/keys/good`, "0123456789abcdef \n\n");
    expect(new TextDecoder().decode(loadPsk(`${dir}/keys/good`))).toBe("0123456789abcdef");
    writeFileSync(`${dir}/keys/short`, "0123456789abcde\n");
    const cases: [string, string][] = [
      [`${dir}/keys/missing`, "no such file"],
      [`${dir}/keys/short`, "key is 15 bytes, at least 16 are required"],
      [`${dir}/keys`, "is a directory"],
    ];
    for (const [path, why] of cases) {
      try {
        loadPsk(path);
        throw new Error(`no error for ${path}`);
      } catch (err) {
        expect(err).toBeInstanceOf(SgmError);
        expect((err as SgmError).kind).toBe("usage");
        expect((err as SgmError).message).toBe(`--psk-file '${path}': ${why}`);
      }
    }
  });
});

describe("connection", () => {
  test("frames that arrive before the handler is set are kept", async () => {
    let sender: PeerConnection | undefined;
    const marks: number[] = [];
    const server = startServer("gather", ["scatter"], {
      onConnection(conn) {
        sender = conn;
        // Sent while the WELCOME may still be queued: the handshake must not count.
        for (let i = 0; i < 100; i++) {
          conn.send(DATA, pattern(i % 2 ? 1000 : 20_000, i));
          marks.push(conn.bytesAccepted);
        }
      },
    });
    const client = await connect(server.listener.port, "scatter");
    await Bun.sleep(100);
    const got: Decoded[] = [];
    const all = new Promise<void>((resolve) =>
      client.onFrame((type, payload) => {
        got.push({ type, payload: payload.slice() });
        if (got.length === 100) resolve();
      }),
    );
    await all;
    expect(got).toEqual(Array.from({ length: 100 }, (_, i) => ({ type: DATA, payload: pattern(i % 2 ? 1000 : 20_000, i) })));
    // bytesAccepted right after send() is where that frame ends.
    const ends = got.map((f) => f.payload.length + 8).map((_, i, sizes) => sizes.slice(0, i + 1).reduce((a, b) => a + b, 0));
    expect(marks).toEqual(ends);
    expect(sender?.bytesSent).toBe(ends[99]);
    expect(sender?.queuedBytes).toBe(0);
    client.close();
    server.listener.close();
  });

  test("a malformed frame from the peer closes the connection with a data error", async () => {
    const server = startServer("gather", ["scatter"]);
    const accepted = server.nextConnection();
    const client = await connect(server.listener.port, "scatter");
    const conn = await accepted;
    conn.onFrame(() => {});
    client.send(99, pattern(10, 0));
    const reason = await conn.closed;
    expect(reason).toBeInstanceOf(SgmError);
    expect((reason as SgmError).kind).toBe("data");
    expect(reason?.message).toBe(`${conn.remoteAddress}: unknown frame type 99, length 10`);
    expect(await client.closed).toBeUndefined();
    expect(() => conn.send(DATA, pattern(1, 0))).toThrow(reason!.message);
    server.listener.close();
  });

  test("an oversize frame and a reserved type are refused after authentication too", async () => {
    const server = startServer("gather", ["scatter"]);
    for (const [type, length, message] of [
      [BIG, (300 << 10) + 1, "frame type 17 length 307201 exceeds its bound of 307200 bytes"],
      [4, 0, "unknown frame type 4, length 0"],
    ] as const) {
      const accepted = server.nextConnection();
      const client = await connect(server.listener.port, "scatter");
      const conn = await accepted;
      conn.onFrame(() => {});
      client.send(type, new Uint8Array(length));
      expect((await conn.closed)?.message).toBe(`${conn.remoteAddress}: ${message}`);
    }
    server.listener.close();
  });

  test("a handler that throws closes the connection with its error", async () => {
    const server = startServer("gather", ["scatter"]);
    const accepted = server.nextConnection();
    const client = await connect(server.listener.port, "scatter");
    const conn = await accepted;
    conn.onFrame(() => {
      throw new SgmError("data", "page record 3 has a bad digest");
    });
    client.send(DATA, pattern(1, 0));
    expect((await conn.closed)?.message).toBe(`${conn.remoteAddress}: page record 3 has a bad digest`);
    server.listener.close();
  });

  test("a peer that goes away mid-frame is reported", async () => {
    const server = startServer("gather", ["scatter"]);
    const accepted = server.nextConnection();
    const peer = await rawAuthenticatedPeer(server.listener.port);
    const conn = await accepted;
    let frames = 0;
    conn.onFrame(() => frames++);
    peer.socket.write(concat([frame(DATA, pattern(10, 0)), header(WIRE_VERSION, DATA, 0, 100), pattern(50, 1)]));
    peer.socket.end();
    const reason = await conn.closed;
    expect(reason?.message).toBe(`${conn.remoteAddress}: connection closed in the middle of a frame`);
    expect((reason as SgmError).kind).toBe("unavailable");
    expect(frames).toBe(1);
    server.listener.close();
  });

  test("abort drops the connection; the peer sees it closed", async () => {
    const server = startServer("gather", ["scatter"]);
    const accepted = server.nextConnection();
    const client = await connect(server.listener.port, "scatter");
    const conn = await accepted;
    conn.onFrame(() => {});
    const reason = new SgmError("interrupted", "stopping");
    client.abort(reason);
    expect(await client.closed).toBe(reason);
    await conn.closed;
    await expect(client.whenWritable()).rejects.toBe(reason);
    server.listener.close();
  });

  test("many small frames sent in one turn arrive in order", async () => {
    const server = startServer("gather", ["scatter"]);
    const accepted = server.nextConnection();
    const client = await connect(server.listener.port, "scatter");
    const conn = await accepted;
    const n = 20_000;
    let seen = 0;
    let ok = true;
    const done = new Promise<void>((resolve) =>
      conn.onFrame((_type, payload) => {
        if (new DataView(payload.buffer, payload.byteOffset).getUint32(0) !== seen) ok = false;
        if (++seen === n) resolve();
      }),
    );
    for (let i = 0; i < n; i++) {
      const p = new Uint8Array(40);
      new DataView(p.buffer).setUint32(0, i);
      client.send(DATA, p);
    }
    expect(client.queuedBytes).toBe(n * 48);
    await done;
    expect(ok).toBe(true);
    expect(client.bytesSent).toBe(n * 48);
    client.close();
    server.listener.close();
  });
});

describe("backpressure and throughput", () => {
  const FRAME = 256 << 10;

  test(
    "a paused receiver bounds the sender's queue, and every byte arrives after it resumes",
    async () => {
      const TOTAL = 256 << 20;
      const MAX_QUEUED = 4 << 20;
      const frames = TOTAL / FRAME;
      const server = startServer("gather", ["scatter"]);
      const accepted = server.nextConnection();
      const client = await connect(server.listener.port, "scatter");
      const conn = await accepted;

      const received = new Bun.CryptoHasher("sha256");
      let receivedFrames = 0;
      let inOrder = true;
      const nativeBefore = bytesReceivedNatively();
      const sentNativelyBefore = bytesSentNatively();
      conn.pauseReading();
      const allReceived = new Promise<void>((resolve) =>
        conn.onFrame((_type, payload) => {
          if (new DataView(payload.buffer, payload.byteOffset).getUint32(0) !== receivedFrames) inOrder = false;
          received.update(payload);
          if (++receivedFrames === frames) resolve();
        }),
      );

      const base = crypto.getRandomValues(new Uint8Array(FRAME));
      const sent = new Bun.CryptoHasher("sha256");
      let peak = 0;
      let sentFrames = 0;
      const sending = (async () => {
        for (let i = 0; i < frames; i++) {
          await client.whenWritable(MAX_QUEUED);
          const payload = base.slice();
          new DataView(payload.buffer).setUint32(0, i);
          sent.update(payload);
          client.send(DATA, payload);
          sentFrames++;
          peak = Math.max(peak, client.queuedBytes);
        }
      })();

      await Bun.sleep(500);
      expect(receivedFrames).toBe(0);
      expect(sentFrames).toBeLessThan(frames); // the sender is held back, not buffering everything
      const stalledAt = sentFrames;
      console.log(`sender stalled after ${stalledAt} frames (${((stalledAt * FRAME) / 2 ** 20).toFixed(1)} MiB), peak queue ${peak} bytes`);
      conn.resumeReading();
      await sending;
      await allReceived;

      expect(peak).toBeLessThanOrEqual(MAX_QUEUED + FRAME + 8);
      expect(inOrder).toBe(true);
      expect(received.digest("hex")).toBe(sent.digest("hex"));
      expect(conn.bytesReceived).toBe(frames * (FRAME + 8));
      // most of it read past Bun's socket, into the one buffer used again, and intact
      if (nativeReceive) expect(bytesReceivedNatively() - nativeBefore).toBeGreaterThan(TOTAL / 4);
      // and every frame written by the connection's own thread
      if (nativeSend) expect(bytesSentNatively() - sentNativelyBefore).toBe(frames * (FRAME + 8));
      client.close();
      expect(await conn.closed).toBeUndefined();
      server.listener.close();
    },
    60_000,
  );

  test(
    "throughput of 1 GiB in 256 KiB frames over loopback",
    async () => {
      const TOTAL = 1 << 30;
      const frames = TOTAL / FRAME;
      const server = startServer("gather", ["scatter"]);
      const accepted = server.nextConnection();
      const client = await connect(server.listener.port, "scatter");
      const conn = await accepted;
      let bytes = 0;
      const done = new Promise<void>((resolve) =>
        conn.onFrame((_type, payload) => {
          bytes += payload.length;
          if (bytes === TOTAL) resolve();
        }),
      );
      const payload = crypto.getRandomValues(new Uint8Array(FRAME));
      const started = performance.now();
      for (let i = 0; i < frames; i++) {
        await client.whenWritable();
        client.send(DATA, payload);
      }
      await done;
      const seconds = (performance.now() - started) / 1000;
      console.log(`loopback: ${(TOTAL / 1e6 / seconds).toFixed(0)} MB/s (1 GiB in 256 KiB frames, ${seconds.toFixed(2)} s)`);
      client.close();
      await conn.closed;
      server.listener.close();
    },
    60_000,
  );
});

describe("reads past Bun's socket", () => {
  test("the native read is there on this machine", () => {
    // every role's receive cost depends on it; SGM_NATIVE_RECEIVE=0 turns it off for measuring
    if (process.env.SGM_NATIVE_RECEIVE !== "0") expect(nativeReceive).toBe(true);
  });

  // with SGM_NATIVE_RECEIVE=0 there is no native read to test
  test.skipIf(!nativeReceive)("a read that fails throws, led by the socket's label, where the end of a stream does not", () => {
    // a file is no socket: recv(2) fails with ENOTSOCK, as a socket its peer reset fails with ECONNRESET
    const file = openSync("/dev/null", "r");
    try {
      expect(() => receiveWaiting(file, "peer 1", () => {}, () => true)).toThrow(new SgmError("unavailable", "peer 1: socket error (errno 88)"));
    } finally {
      closeSync(file);
    }
  });

  test.skipIf(!nativeReceive)("the end of a stream stops the reads quietly: Bun's socket reports it", async () => {
    const accepted = Promise.withResolvers<Socket<undefined>>();
    const listener = Bun.listen({
      hostname: HOST,
      port: 0,
      socket: {
        open(socket) {
          socket.pause(); // Bun's socket reads nothing: what arrives waits for receiveWaiting
          accepted.resolve(socket);
        },
        data() {},
      },
    });
    const client = await Bun.connect({ hostname: HOST, port: listener.port, socket: { data() {} } });
    const server = await accepted.promise;
    client.write(pattern(1000, 1));
    client.end();
    let got = 0;
    const deadline = Date.now() + 5000;
    while (got < 1000 && Date.now() < deadline) {
      got += receiveWaiting(socketFd(server), "peer 1", () => {}, () => true);
      if (got < 1000) await Bun.sleep(5);
    }
    expect(got).toBe(1000);
    expect(receiveWaiting(socketFd(server), "peer 1", () => {}, () => true)).toBe(0);
    server.terminate();
    listener.stop(true);
  });
});

describe("writes on a thread of their own", () => {
  test("the native sender is there on this machine", () => {
    // every role's event loop depends on it; SGM_NATIVE_SEND=0 turns it off for measuring
    if (process.env.SGM_NATIVE_SEND !== "0") expect(nativeSend).toBe(true);
  });

  /** A connected pair of plain Bun sockets; the server side reads nothing until resumed. */
  async function socketPair(): Promise<{ client: Socket<undefined>; server: Socket<undefined>; received: () => Uint8Array; peerClosed: () => boolean; stop: () => void }> {
    const accepted = Promise.withResolvers<Socket<undefined>>();
    const chunks: Uint8Array[] = [];
    let closed = false;
    const listener = Bun.listen({
      hostname: HOST,
      port: 0,
      socket: {
        open(socket) {
          socket.pause();
          accepted.resolve(socket);
        },
        data(_socket, chunk) {
          chunks.push(chunk.slice());
        },
        close() {
          closed = true;
        },
      },
    });
    const client = await Bun.connect({ hostname: HOST, port: listener.port, socket: { data() {} } });
    const server = await accepted.promise;
    return { client, server, received: () => concat(chunks), peerClosed: () => closed, stop: () => listener.stop(true) };
  }

  async function until(what: string, done: () => boolean): Promise<void> {
    const deadline = Date.now() + 10_000;
    while (!done()) {
      if (Date.now() > deadline) throw new Error(`not within 10 s: ${what}`);
      await Bun.sleep(5);
    }
  }

  test.skipIf(!nativeSend)("more buffers than its ring holds, given in one turn to a peer not reading, arrive in order and intact", async () => {
    const pair = await socketPair();
    let woken = 0;
    const sender = NativeSender.open(socketFd(pair.client), () => woken++, (errno) => {
      throw new Error(`errno ${errno}`);
    })!;
    // 3000 buffers against a ring of 1024 slots: the rest wait in the sender until the ring has room
    const parts = Array.from({ length: 3000 }, (_, i) => pattern(1000 + (i % 7) * 100, i));
    for (const part of parts) sender.write(part);
    const total = parts.reduce((n, p) => n + p.length, 0);
    sender.wakeWhenUnwrittenAtMost(0);
    pair.server.resume();
    await until("every byte written", () => sender.written === total);
    await until("the wake once all was written", () => woken > 0);
    expect(woken).toBe(1);
    expect(sender.unwritten).toBe(0);
    await until("every byte received", () => pair.received().length === total);
    expect(pair.received()).toEqual(concat(parts));
    sender.close();
    pair.client.terminate();
    pair.stop();
  });

  test.skipIf(!nativeSend)("a write to a peer that went away reports its errno once", async () => {
    const pair = await socketPair();
    const errors: number[] = [];
    const sender = NativeSender.open(socketFd(pair.client), () => {}, (errno) => errors.push(errno))!;
    pair.server.terminate();
    pair.stop();
    // the first writes may still be taken by the kernel; those after the peer's reset fail
    const chunk = pattern(64 << 10, 1);
    await until("a failed write", () => {
      if (errors.length === 0 && sender.unwritten < 1 << 20) sender.write(chunk);
      return errors.length > 0;
    });
    await Bun.sleep(50); // no second report
    expect(errors.length).toBe(1);
    expect([32, 104]).toContain(errors[0]!); // EPIPE or ECONNRESET
    sender.close();
    pair.client.terminate();
  });

  test.skipIf(!nativeSend)("closing a sender whose peer reads nothing returns at once, and its descriptor with it", async () => {
    const pair = await socketPair();
    const sender = NativeSender.open(socketFd(pair.client), () => {}, () => {})!;
    for (let i = 0; i < 64; i++) sender.write(pattern(1 << 20, i)); // far more than the socket buffers take
    await until("the socket full", () => sender.written > 0);
    const started = performance.now();
    sender.close();
    expect(performance.now() - started).toBeLessThan(1000);
    // the sender wrote to a descriptor of its own: were it still open, closing Bun's would not close the socket
    pair.client.terminate();
    pair.server.resume();
    await until("the peer sees the socket closed", () => pair.peerClosed());
    pair.stop();
  });
  test.skipIf(!nativeSend)("while the thread writes, bytesAccepted stays where the last frame ends; bytesSent never passes it", async () => {
    // senders reuse a buffer once bytesSent reaches where its frame ended: a mark read as
    // bytesSent + queuedBytes could fall short by what the thread wrote between the two reads
    const server = startServer("gather", ["scatter"]);
    const accepted = server.nextConnection();
    const client = await connect(server.listener.port, "scatter");
    const conn = await accepted;
    conn.pauseReading();
    let got = 0;
    const FRAMES = 2000;
    const all = new Promise<void>((resolve) =>
      conn.onFrame(() => {
        if (++got === FRAMES) resolve();
      }),
    );
    for (let i = 0; i < FRAMES; i++) client.send(DATA, pattern(20_000, i));
    const end = FRAMES * 20_008;
    conn.resumeReading();
    let samples = 0;
    let wrong = 0;
    while (client.bytesSent < end) {
      if (client.bytesAccepted !== end || client.bytesSent > end) wrong++;
      if (++samples % 64 === 0) await Bun.sleep(0);
    }
    await all;
    expect(wrong).toBe(0);
    expect(samples).toBeGreaterThan(0);
    client.close();
    server.listener.close();
  });

  test.skipIf(!nativeSend)("what a sender holds when its process exits is written first", async () => {
    // a child that gives its sender 32 MiB and exits at once: far more than the socket's buffers take before it exits
    let received = 0;
    const done = Promise.withResolvers<void>();
    const server = Bun.listen({
      hostname: HOST,
      port: 0,
      socket: {
        data(_socket, chunk) {
          received += chunk.length;
        },
        close() {
          done.resolve();
        },
      },
    });
    const child = Bun.spawn(
      [
        process.execPath,
        "-e",
        `import { NativeSender } from ${JSON.stringify(`${import.meta.dir}/../core/net/socket-send.ts`)};
         import { socketFd } from ${JSON.stringify(`${import.meta.dir}/../core/net/socket-receive.ts`)};
         const socket = await Bun.connect({ hostname: "${HOST}", port: ${server.port}, socket: { data() {} } });
         const sender = NativeSender.open(socketFd(socket), () => {}, () => {});
         for (let i = 0; i < 32; i++) sender.write(new Uint8Array(1 << 20).fill(i));
         process.exit(0);`,
      ],
      { stdout: "inherit", stderr: "inherit" },
    );
    expect(await child.exited).toBe(0);
    await done.promise;
    expect(received).toBe(32 << 20);
    server.stop(true);
  });
});
