// Reads what waits on a plain socket into one buffer used again, through
// native/socket-receive.c, after Bun's socket has reported data. Bun reads
// each chunk into a fresh buffer and that costs a receiving role about a
// third of what it spends taking bytes in (docs/cost-history.md); reading
// the rest of what is waiting here, on the event loop's own thread, needs no
// hand-off to another thread.
//
// The bytes given to `feed` are valid only during the call: the next read
// overwrites them. Never over TLS: the socket's fd carries ciphertext.

import { JSCallback, ptr, toArrayBuffer, type Pointer } from "bun:ffi";
import library from "../../native/socket-receive.so" with { type: "file" };
import { openLibrary } from "../native-library.ts";
import { SgmError, asSgmError } from "../errors.ts";
import { scribbleHandled } from "../test-faults.ts";

const BUFFER_BYTES = 1 << 20;
/**
 * At most this much a data event: a sender that keeps the socket full would
 * otherwise hold the event loop in one socket's loop, and every other socket
 * and timer of the process would wait (Bun reads one chunk a socket a turn).
 * What is left waits for Bun's next read, which the socket's data triggers.
 */
const TURN_BYTES = 4 * BUFFER_BYTES;

const EAGAIN = 11;
/** Errors a read or write can report on a socket whose peer went away, by errno. */
const ERRNO_NAMES: Record<number, string> = {
  32: "connection closed by peer",
  103: "connection aborted",
  104: "connection reset by peer",
  110: "connection timed out",
  113: "no route to host",
};

const symbolDefinitions = {
  sgm_receive: { args: ["i32", "ptr", "u64"], returns: "i64" },
  sgm_receiver_open: { args: ["i32", "i32", "function", "ptr", "u32", "u64"], returns: "ptr" },
  sgm_receiver_release: { args: ["ptr", "u32"], returns: "void" },
  sgm_receiver_wake_after: { args: ["ptr", "u32"], returns: "i32" },
  sgm_receiver_send_now: { args: ["ptr", "ptr", "u64"], returns: "i64" },
  sgm_receiver_shutdown_write: { args: ["ptr"], returns: "i32" },
  sgm_receiver_close: { args: ["ptr"], returns: "void" },
} as const;

function load() {
  // for measuring what it saves, against Bun's reads alone
  if (process.env.SGM_NATIVE_RECEIVE === "0") return null;
  try {
    return openLibrary(library, symbolDefinitions).symbols;
  } catch {
    return null;
  }
}

const native = load();
const receive = native?.sgm_receive ?? null;
const buffer = new Uint8Array(receive ? BUFFER_BYTES : 0);
/** One buffer for every socket: set while its bytes are being fed, so a feed cannot start another read into it. */
let feeding = false;
let receivedInAll = 0;

/** What a socket's errno means, for an error message. */
export function socketErrnoReason(errno: number): string {
  return ERRNO_NAMES[errno] ?? `socket error (errno ${errno})`;
}

/** Whether reads go past Bun's socket (the native object loaded, and not turned off). */
export const nativeReceive = receive !== null;

/** The socket's file descriptor, or -1: Bun's sockets have one (1.4.5 here), but its types do not say so. */
export function socketFd(socket: object | undefined): number {
  const fd = (socket as { fd?: unknown } | undefined)?.fd;
  return typeof fd === "number" ? fd : -1;
}

/** Bytes this process has read past Bun's sockets. */
export function bytesReceivedNatively(): number {
  return receivedInAll;
}

/**
 * Reads what `fd` has waiting, a buffer at a time, while `more()` holds,
 * handing each read to `feed`. Returns the bytes read: it stops at an empty
 * socket, after TURN_BYTES, and at the peer's end of stream (Bun's socket
 * reports that end itself), and throws if the socket failed, its message
 * led by `label`.
 */
export function receiveWaiting(fd: number, label: string, feed: (bytes: Uint8Array) => void, more: () => boolean): number {
  if (!receive || feeding || fd < 0) return 0;
  let total = 0;
  while (total < TURN_BYTES && more()) {
    const n = Number(receive(fd, buffer, BUFFER_BYTES));
    if (n === 0 || n === -EAGAIN) break;
    if (n < 0) throw new SgmError("unavailable", `${label}: ${socketErrnoReason(-n)}`);
    total += n;
    receivedInAll += n;
    const bytes = buffer.subarray(0, n);
    feeding = true;
    try {
      feed(bytes);
    } finally {
      feeding = false;
      scribbleHandled(bytes);
    }
    if (n < BUFFER_BYTES) break;
  }
  return total;
}

/**
 * A QEMU stream has carried this much through Bun's socket before it gets a
 * thread of its own (net/byte-socket.ts): a source's pages pass it within
 * their first milliseconds, while a destination QEMU's return path rarely
 * does, and spares the thread and its buffers.
 */
export const RECEIVE_THREAD_AFTER_BYTES = 4 << 20;
const RING_BUFFERS = 4;
const RING_BUFFER_BYTES = 1 << 20;

/** Threads by id, for the one callback every receive thread wakes. */
const receiveThreads = new Map<number, ReceiveThread>();
let nextThreadId = 1;
let threadWake: JSCallback | null = null;
let threadsStarted = 0;

/** Receive threads this process has started. */
export function receiveThreadsStarted(): number {
  return threadsStarted;
}

/** How a stream read by a ReceiveThread ended: the peer's end of stream, or the error that stopped it. */
export type ReceiveEnd = { error: null } | { error: SgmError };

/**
 * Reads a socket on a thread of its own (native/socket-receive.c) into a
 * ring of buffers, and feeds them in order to `feed` on the event loop's
 * thread while `wanted()` holds. The event loop then spends nothing on the
 * kernel's copy, and nothing on Bun's fresh buffer for every read. The
 * thread reads its own duplicate of the descriptor, and the caller must
 * close Bun's socket right after open() (before the event loop turns):
 * Bun reads a socket it keeps, paused or not, when its peer hangs up. The
 * bytes given to `feed` are valid only during the call. Never over TLS:
 * the socket's fd carries ciphertext.
 */
export class ReceiveThread {
  private readonly handle: Pointer;
  private readonly id: number;
  private readonly label: string;
  /** [filled, end, lengths...] over the native receiver's first bytes; null once closed. */
  private status: Int32Array | null;
  private readonly buffers: Uint8Array;
  private readonly feed: (bytes: Uint8Array) => void;
  private readonly wanted: () => boolean;
  private readonly onEnd: (end: ReceiveEnd) => void;
  /** Buffers fed so far, as the thread counts them (mod 2^32). */
  private fed = 0;
  private ended = false;
  private draining = false;
  private drainQueued = false;

  private constructor(handle: Pointer, id: number, buffers: Uint8Array, label: string, feed: (bytes: Uint8Array) => void, wanted: () => boolean, onEnd: (end: ReceiveEnd) => void) {
    this.handle = handle;
    this.id = id;
    this.buffers = buffers;
    this.label = label;
    this.status = new Int32Array(toArrayBuffer(handle, 0, 8 + 4 * RING_BUFFERS));
    this.feed = feed;
    this.wanted = wanted;
    this.onEnd = onEnd;
  }

  /**
   * A thread reading `fd`, or null where there is none (no native object,
   * or the thread could not start): read through Bun's socket then.
   * `onEnd` runs once, after every byte read before the end was fed, unless
   * close() came first.
   */
  static open(fd: number, label: string, feed: (bytes: Uint8Array) => void, wanted: () => boolean, onEnd: (end: ReceiveEnd) => void): ReceiveThread | null {
    if (!native || fd < 0) return null;
    if (!threadWake) {
      threadWake = new JSCallback((id: number) => receiveThreads.get(id)?.drain(), { args: ["i32"], returns: "void", threadsafe: true });
      // stopped before the runtime goes: no thread may call back into it meanwhile
      process.on("exit", () => {
        for (const thread of [...receiveThreads.values()]) thread.close();
      });
    }
    const buffers = new Uint8Array(RING_BUFFERS * RING_BUFFER_BYTES);
    const id = nextThreadId++;
    const handle = native.sgm_receiver_open(fd, id, threadWake.ptr, ptr(buffers), RING_BUFFERS, RING_BUFFER_BYTES) as Pointer | null;
    if (handle === null) return null;
    const thread = new ReceiveThread(handle, id, buffers, label, feed, wanted, onEnd);
    receiveThreads.set(id, thread);
    threadsStarted++;
    thread.drainSoon();
    return thread;
  }

  /** Feeds what the thread has read, on a later turn: for a caller whose `wanted()` has just come true. */
  drainSoon(): void {
    if (this.drainQueued || this.status === null) return;
    this.drainQueued = true;
    setImmediate(() => {
      this.drainQueued = false;
      this.drain();
    });
  }

  /**
   * Sends what the socket takes of `bytes` now, on this thread, as Bun's
   * write() did: the bytes sent, 0 where none fit or the send failed (the
   * sender thread, writing next, meets the failure and reports it).
   */
  sendNow(bytes: Uint8Array): number {
    if (this.status === null || bytes.length === 0) return 0;
    return Math.max(0, Number(native!.sgm_receiver_send_now(this.handle, ptr(bytes), bytes.length)));
  }

  /** Ends the socket's sending side, as Bun's end() did: returns the errno where that failed, else 0. */
  shutdownWrite(): number {
    if (this.status === null) return 0;
    return -native!.sgm_receiver_shutdown_write(this.handle);
  }

  /** Stops the thread and closes its descriptor; what it read and was not fed is dropped, and onEnd does not run. */
  close(): void {
    if (this.status === null) return;
    this.status = null;
    receiveThreads.delete(this.id);
    native!.sgm_receiver_close(this.handle);
  }

  /** Feeds what the thread has read while wanted, up to TURN_BYTES a turn; asks for a wake when it has fed all. */
  private drain(): void {
    if (this.draining) return;
    this.draining = true;
    try {
      let turn = 0;
      for (;;) {
        const status = this.status;
        if (status === null || !this.wanted()) return;
        if (turn >= TURN_BYTES) {
          // the rest on a later turn: other sockets and timers of the process go first
          this.drainQueued = false;
          this.drainSoon();
          return;
        }
        if (this.fed !== Atomics.load(status, 0) >>> 0) {
          turn += this.feedOne(status);
          continue;
        }
        const end = Atomics.load(status, 1);
        if (end !== 0) {
          // every buffer filled before the end is fed: nothing more comes
          if (this.fed !== Atomics.load(status, 0) >>> 0) continue;
          this.close();
          this.ended = true;
          this.onEnd(end === 1 ? { error: null } : { error: new SgmError("unavailable", `${this.label}: ${socketErrnoReason(-end)}`) });
          return;
        }
        if (native!.sgm_receiver_wake_after(this.handle, this.fed) === 0) return;
      }
    } catch (err) {
      // the callers' feeds and onEnd handle their own errors: this is the last guard, as a wake has no caller to throw to
      this.close();
      if (!this.ended) {
        this.ended = true;
        this.onEnd({ error: asSgmError(err) });
      }
    } finally {
      this.draining = false;
    }
  }

  private feedOne(status: Int32Array): number {
    const slot = this.fed % RING_BUFFERS;
    const length = status[2 + slot]!;
    const bytes = this.buffers.subarray(slot * RING_BUFFER_BYTES, slot * RING_BUFFER_BYTES + length);
    this.fed = (this.fed + 1) >>> 0;
    receivedInAll += length;
    try {
      this.feed(bytes);
    } finally {
      scribbleHandled(bytes);
      // handed back even when feed threw: the caller closes what failed
      if (this.status !== null) native!.sgm_receiver_release(this.handle, this.fed);
    }
    return length;
  }
}
