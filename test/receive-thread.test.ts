// A QEMU stream that passes RECEIVE_THREAD_AFTER_BYTES is read on a thread
// of its own (core/net/socket-receive.ts, ReceiveThread): through real unix
// sockets, every byte must reach the data handler once, in order, whatever
// pauses the reader makes, with the peer's end after the last of them, even
// when the peer has hung up while reading was paused.

import { afterAll, describe, expect, test } from "bun:test";
import type { Socket } from "bun";
import { ByteSocket } from "../core/net/byte-socket.ts";
import { RECEIVE_THREAD_AFTER_BYTES, receiveThreadsStarted } from "../core/net/socket-receive.ts";
import { makeTempDir, removeDir } from "./harness/tmp.ts";
import { within } from "./harness/within.ts";

const dir = makeTempDir("receive-thread");
afterAll(() => removeDir(dir));
let nextPath = 0;

/** Bytes no shift or repeat of which matches itself: a byte out of place shows. */
function pattern(bytes: number, seed: number): Uint8Array {
  const out = new Uint8Array(bytes);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < bytes; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

interface Writer {
  /** What the writer read from the stream, once the stream's end came. */
  heardEnd: Promise<Uint8Array>;
  /** Resolves once every byte is handed to the kernel. */
  written: Promise<void>;
  /** Resolves once a write found the socket full: its reader has stopped taking bytes, for now at least. */
  stalled: Promise<void>;
  socket: Socket<unknown>;
  /** Resolves once the writer's socket is closed. */
  closed: Promise<void>;
}

/** Connects to `path` and writes all of `data`, reading nothing with `deaf`. */
async function write(path: string, data: Uint8Array, deaf = false): Promise<Writer> {
  let offset = 0;
  const written = Promise.withResolvers<void>();
  const stalled = Promise.withResolvers<void>();
  const closed = Promise.withResolvers<void>();
  const pump = (s: Socket<unknown>): void => {
    while (offset < data.length) {
      const n = s.write(data.subarray(offset, Math.min(offset + (256 << 10), data.length)));
      offset += Math.max(n, 0);
      if (n <= 0) {
        stalled.resolve();
        return;
      }
    }
    written.resolve();
  };
  const open = (s: Socket<unknown>): void => {
    if (deaf) s.pause();
    pump(s);
  };
  const heard: Uint8Array[] = [];
  const heardEnd = Promise.withResolvers<Uint8Array>();
  const socket = await Bun.connect({
    unix: path,
    allowHalfOpen: true,
    socket: { open, drain: pump, data: (_s, d) => void heard.push(new Uint8Array(d)), end: () => heardEnd.resolve(Buffer.concat(heard)), close: () => closed.resolve() },
  });
  return { written: written.promise, stalled: stalled.promise, socket, closed: closed.promise, heardEnd: heardEnd.promise };
}

/** A ByteSocket listening on a fresh path, and a writer of `data` connected to it. */
async function streamOf(data: Uint8Array, deaf = false): Promise<{ stream: ByteSocket; writer: Writer }> {
  const path = `${dir}/s${nextPath++}.sock`;
  const { accepted } = ByteSocket.listenUnixOnce(path, "test stream");
  const writer = await write(path, data, deaf);
  return { stream: await accepted, writer };
}

/** Every byte of `data` arrived once, in order, and the end once after the last; then the stream closed cleanly. */
async function expectWholeThenEnd(r: ReturnType<typeof reader>, stream: ByteSocket, data: Uint8Array): Promise<void> {
  await within(r.ended, 30_000, "the stream's end reached the end handler");
  expect(r.endAt()).toBe(data.length);
  expect(Buffer.compare(r.got(), data)).toBe(0);
  expect(await within(stream.closed, 10_000, "the stream closed after its end")).toBeUndefined();
  expect(r.ends()).toBe(1);
}

/** Takes a stream into `got`, pausing after every `pauseEvery` bytes until `resumeWhen()` resolves. */
function reader(stream: ByteSocket, total: number, pauseEvery: number, resumeWhen: () => Promise<unknown>) {
  const got = new Uint8Array(total + (1 << 20));
  let length = 0;
  let ends = 0;
  let endAt = -1;
  let nextPause = pauseEvery;
  const ended = Promise.withResolvers<void>();
  stream.setDataHandler((bytes) => {
    if (length + bytes.length > got.length) throw new Error(`more than the ${total} bytes sent`);
    got.set(bytes, length);
    length += bytes.length;
    if (length >= nextPause) {
      nextPause += pauseEvery;
      stream.pause();
      void resumeWhen().then(() => stream.resume());
    }
  });
  stream.setEndHandler(() => {
    ends++;
    endAt = length;
    ended.resolve();
  });
  return { got: () => got.subarray(0, length), ends: () => ends, endAt: () => endAt, ended: ended.promise };
}

describe("a QEMU stream read on a thread of its own", () => {
  test("64 MiB reach the data handler whole and in order though reading pauses and resumes; the end comes once, after the last byte", async () => {
    const data = pattern(64 << 20, 7);
    const threads = receiveThreadsStarted();
    const { stream, writer } = await streamOf(data);
    let pauses = 0;
    // resumed on a later turn, a timer's or an immediate's by turns: the thread fills its ring meanwhile
    const r = reader(stream, data.length, 3 << 20, () => (++pauses % 2 ? new Promise((go) => setTimeout(go, 1)) : new Promise((go) => setImmediate(go))));
    await within(writer.written, 30_000, "the writer handed its 64 MiB to the kernel");
    writer.socket.end();
    await expectWholeThenEnd(r, stream, data);
    expect(receiveThreadsStarted()).toBe(threads + 1);
    expect(pauses).toBeGreaterThan(10);
  });

  test("the writer hangs up while reading is paused: every byte it sent still arrives, in order, then the end", async () => {
    // what follows the pause fits the thread's ring and the socket's buffers, whatever their sizes here
    const data = pattern(RECEIVE_THREAD_AFTER_BYTES + (1 << 20) + (256 << 10), 11);
    const threads = receiveThreadsStarted();
    const { stream, writer } = await streamOf(data);
    const hungUp = Promise.withResolvers<void>();
    // paused once the thread reads, until the writer has written all and closed its socket
    const r = reader(stream, data.length, RECEIVE_THREAD_AFTER_BYTES + (1 << 20), () => hungUp.promise);
    await within(writer.written, 30_000, "the writer handed all its bytes to the kernel");
    writer.socket.end();
    await within(writer.closed, 10_000, "the writer's socket closed");
    hungUp.resolve();
    await expectWholeThenEnd(r, stream, data);
    expect(receiveThreadsStarted()).toBe(threads + 1);
  });

  test("once the thread reads, what the stream writes still reaches its peer, and end() ends it", async () => {
    const data = pattern(RECEIVE_THREAD_AFTER_BYTES + (2 << 20), 17);
    const back = pattern(3 << 20, 19);
    const threads = receiveThreadsStarted();
    const { stream, writer } = await streamOf(data);
    const all = Promise.withResolvers<void>();
    // the one "pause" comes with the last byte: it tells the test so, and reading goes on at once
    const r = reader(stream, data.length, data.length, async () => all.resolve());
    await within(all.promise, 30_000, "every byte sent reached the data handler");
    expect(receiveThreadsStarted()).toBe(threads + 1);
    // a small write finding the sender idle goes at once, through the thread's descriptor; the rest through the sender
    stream.write(back.subarray(0, 1024));
    stream.write(back.subarray(1024));
    stream.end();
    const heard = await within(writer.heardEnd, 30_000, "the writer read the stream's end");
    expect(Buffer.compare(heard, back)).toBe(0);
    expect(Buffer.compare(r.got(), data)).toBe(0);
    writer.socket.end();
    expect(await within(stream.closed, 10_000, "the stream closed")).toBeUndefined();
  });

  test("destroyed while its thread waits on a full ring, the stream closes at once and feeds nothing more", async () => {
    const data = pattern(RECEIVE_THREAD_AFTER_BYTES + (64 << 20), 23);
    const { stream, writer } = await streamOf(data);
    const pausedAt = RECEIVE_THREAD_AFTER_BYTES + (1 << 20);
    const r = reader(stream, data.length, pausedAt, () => new Promise(() => {}));
    await within(writer.stalled, 30_000, "the writer found the socket full, the reader paused");
    const fed = r.got().length;
    stream.destroy(new Error("stopped by the test"));
    expect((await within(stream.closed, 5_000, "the destroyed stream closed"))?.message).toBe("stopped by the test");
    expect(r.got().length).toBe(fed);
    expect(Buffer.compare(r.got(), data.subarray(0, fed))).toBe(0);
    writer.socket.terminate();
  });

  test("a data handler that throws after the hand-over closes the stream with what it threw, and is fed nothing more", async () => {
    // past what one of Bun's data events may read before the hand-over (its chunk and 4 MiB read past it)
    const throwAt = 3 * RECEIVE_THREAD_AFTER_BYTES;
    const data = pattern(throwAt + (8 << 20), 29);
    const threads = receiveThreadsStarted();
    const { stream, writer } = await streamOf(data);
    let fed = 0;
    let afterThrow = 0;
    stream.setDataHandler((bytes) => {
      if (fed >= throwAt) {
        afterThrow++;
        throw new Error("a stream the parser refuses");
      }
      fed += bytes.length;
    });
    const reason = await within(stream.closed, 30_000, "the stream closed after its handler threw");
    expect(reason?.message).toBe("a stream the parser refuses");
    expect(afterThrow).toBe(1);
    expect(receiveThreadsStarted()).toBe(threads + 1);
    writer.socket.terminate();
  });

  test("a peer that closes with our bytes unread resets the stream: what it sent before arrives, then the stream closes with the reset as its reason", async () => {
    const data = pattern(RECEIVE_THREAD_AFTER_BYTES + (4 << 20), 13);
    const threads = receiveThreadsStarted();
    const { stream, writer } = await streamOf(data, true);
    // the writer never reads these: its close with them waiting resets the stream (unix(7) stream sockets)
    stream.write(new Uint8Array(4096).fill(1));
    const r = reader(stream, data.length, Infinity, async () => {});
    await within(writer.written, 30_000, "the writer handed all its bytes to the kernel");
    while (stream.queuedBytes > 0) await within(stream.whenWritable(0), 10_000, "our 4 KiB reached the kernel");
    writer.socket.terminate();
    const reason = await within(stream.closed, 30_000, "the stream closed after the reset");
    expect(reason?.message).toMatch(/^test stream: .*reset/i);
    expect(receiveThreadsStarted()).toBe(threads + 1);
    expect(Buffer.compare(r.got(), data)).toBe(0);
    expect(r.ends()).toBe(0);
  });
});
