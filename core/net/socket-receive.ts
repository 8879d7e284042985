// Reads what waits on a plain socket into one buffer used again, through
// native/socket-receive.c, after Bun's socket has reported data. Bun reads
// each chunk into a fresh buffer and that costs a receiving role about a
// third of what it spends taking bytes in (README, Cost per GiB); reading
// the rest of what is waiting here, on the event loop's own thread, needs no
// hand-off to another thread.
//
// The bytes given to `feed` are valid only during the call: the next read
// overwrites them. Never over TLS: the socket's fd carries ciphertext.

import { dlopen } from "bun:ffi";
import library from "../../native/socket-receive.so" with { type: "file" };
import { SgmError } from "../errors.ts";
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

type Receive = (fd: number, buffer: Uint8Array, length: number) => number | bigint;

function load(): Receive | null {
  // for measuring what it saves, against Bun's reads alone
  if (process.env.SGM_NATIVE_RECEIVE === "0") return null;
  try {
    return dlopen(library, { sgm_receive: { args: ["i32", "ptr", "u64"], returns: "i64" } }).symbols.sgm_receive as Receive;
  } catch {
    return null;
  }
}

const receive = load();
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
