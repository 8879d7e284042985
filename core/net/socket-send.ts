// Writes a socket's bytes on a thread of its own (native/socket-send.c), so
// that the event loop's thread, which bounds how fast a process moves pages,
// spends nothing on handing them to the kernel; that thread also writes many
// buffers with one system call where Bun's write() takes one at a time.
//
// The buffers given to write() are the kernel's until `written` passes them:
// this class keeps them referenced until then, and the caller must not
// change them (as with Bun's socket, whose unwritten rest the caller keeps).
// Never over TLS: the socket's fd carries ciphertext.

import { JSCallback, ptr, toArrayBuffer, type Pointer } from "bun:ffi";
import library from "../../native/socket-send.so" with { type: "file" };
import { openLibrary } from "../native-library.ts";

const symbolDefinitions = {
  sgm_sender_open: { args: ["i32", "i32", "function"], returns: "ptr" },
  sgm_sender_push: { args: ["ptr", "ptr", "u64"], returns: "i32" },
  sgm_sender_wake_at: { args: ["ptr", "f64"], returns: "i32" },
  sgm_sender_close: { args: ["ptr"], returns: "f64" },
} as const;

function load() {
  // for measuring what it saves, against Bun's writes
  if (process.env.SGM_NATIVE_SEND === "0") return null;
  try {
    return openLibrary(library, symbolDefinitions).symbols;
  } catch {
    return null;
  }
}

const native = load();
/** Senders by id, for the one callback every sender thread wakes. */
const senders = new Map<number, NativeSender>();
let nextId = 1;
let wakeCallback: JSCallback | null = null;
let sentInAll = 0;

/** Whether writes go past Bun's socket (the native object loaded, and not turned off). */
export const nativeSend = native !== null;

/** Bytes this process has written to sockets from its own threads. */
export function bytesSentNatively(): number {
  for (const sender of senders.values()) sender.refresh();
  return sentInAll;
}

/**
 * What senders still hold when the process exits is written first, for at
 * most this long in all. Bun's write() handed a frame to the kernel at once,
 * so a frame queued just before process.exit() (a gather's last releases to
 * its relays, a final word to a peer) left with it; a sender's thread dies
 * with the process.
 */
const EXIT_DRAIN_MS = 2000;

function drainBeforeExit(): void {
  const deadline = performance.now() + EXIT_DRAIN_MS;
  for (const sender of senders.values()) {
    while (!sender.drainedForExit() && performance.now() < deadline) Bun.sleepSync(1);
  }
  // stopped before the runtime goes: no thread may call back into it meanwhile
  for (const sender of [...senders.values()]) sender.close();
}

/** Up to this much, a write that finds the sender idle goes at once on the event loop's thread (see NativeSender.idle). */
export const WRITE_NOW_MAX_BYTES = 64 << 10;

/** At most this long, a typed array may hold its bytes in the engine's cell (JSC: 1000 elements). */
const SMALL_ARRAY_BYTES = 8192;

interface Pending {
  bytes: Uint8Array;
  /** Where these bytes end in the socket's stream, counted from the sender's start. */
  end: number;
}

export class NativeSender {
  private readonly handle: Pointer;
  private readonly id: number;
  /** [written bytes], [error] over the native sender's first 16 bytes; null once closed. */
  private status: { written: Float64Array; error: Int32Array } | null;
  private readonly onProgress: () => void;
  private readonly onError: (errno: number) => void;
  /** In the ring, in order, from `ringHead`; and taken but not yet in the ring (the ring was full). */
  private ring: Pending[] = [];
  private ringHead = 0;
  private waiting: Pending[] = [];
  private waitingHead = 0;
  private taken = 0;
  private seenWritten = 0;
  /** onProgress() once this many bytes are written in all; Infinity: not asked. */
  private wakeTarget = Infinity;
  private failed = false;

  private constructor(handle: Pointer, id: number, onProgress: () => void, onError: (errno: number) => void) {
    this.handle = handle;
    this.id = id;
    const buffer = toArrayBuffer(handle, 0, 16);
    this.status = { written: new Float64Array(buffer, 0, 1), error: new Int32Array(buffer, 8, 1) };
    this.onProgress = onProgress;
    this.onError = onError;
  }

  /**
   * A sender for the socket `fd`, or null where there is none (no native
   * object, or the thread could not start): write with Bun's socket then.
   * `onProgress` runs after bytes asked for with wakeWhenUnwrittenAtMost()
   * are written; `onError` once, with the errno of a failed write.
   */
  static open(fd: number, onProgress: () => void, onError: (errno: number) => void): NativeSender | null {
    if (!native || fd < 0) return null;
    if (!wakeCallback) {
      wakeCallback = new JSCallback((id: number) => senders.get(id)?.wake(), { args: ["i32"], returns: "void", threadsafe: true });
      process.on("exit", drainBeforeExit);
    }
    const id = nextId++;
    const handle = native.sgm_sender_open(fd, id, wakeCallback.ptr) as Pointer | null;
    if (handle === null) return null;
    const sender = new NativeSender(handle, id, onProgress, onError);
    senders.set(id, sender);
    return sender;
  }

  /** Bytes handed to the kernel. */
  get written(): number {
    this.refresh();
    return this.seenWritten;
  }

  /** Bytes taken by write() and not yet handed to the kernel. */
  get unwritten(): number {
    this.refresh();
    return this.taken - this.seenWritten;
  }

  /**
   * Bytes taken by write() in all: where the last of them ends in the
   * stream. Unlike written + unwritten, one number, which a concurrent write
   * by the thread cannot make inconsistent.
   */
  get takenBytes(): number {
    return this.taken;
  }

  /**
   * Nothing is waiting to be written: the thread is idle, and a caller may
   * write to the socket itself meanwhile without reordering anything. A
   * small write that finds the thread idle goes at once from the event loop
   * (Bun's write()), sparing a thread's wake-up its latency; the thread
   * takes over once writes queue up behind one another.
   */
  get idle(): boolean {
    return this.unwritten === 0;
  }

  /** Takes `bytes`, written after everything taken before. */
  write(bytes: Uint8Array): void {
    if (bytes.length === 0 || this.status === null) return;
    this.taken += bytes.length;
    const pending = { bytes, end: this.taken };
    if (this.waitingHead === this.waiting.length && this.push(pending)) return;
    this.waiting.push(pending);
    this.askToWake();
  }

  /** onProgress() runs once at most `bytes` of what is taken now are unwritten (soon, if they are). */
  wakeWhenUnwrittenAtMost(bytes: number): void {
    this.wakeTarget = Math.min(this.wakeTarget, this.taken - bytes);
    this.askToWake();
  }

  /** Stops writing, whatever is left unwritten; returns the bytes written in all, the thread's last ones included. */
  close(): number {
    if (this.status === null) return this.seenWritten;
    this.refresh();
    this.status = null;
    senders.delete(this.id);
    // what the thread wrote up to its stop counts too
    const written = native!.sgm_sender_close(this.handle);
    sentInAll += written - this.seenWritten;
    this.seenWritten = written;
    this.ring = [];
    this.waiting = [];
    return written;
  }

  /** At exit: pushes what waits as the ring makes room; true once all is written, or nothing more will be. */
  drainedForExit(): boolean {
    if (this.status === null || this.failed || this.status.error[0] !== 0) return true;
    this.refresh();
    while (this.waitingHead < this.waiting.length && this.push(this.waiting[this.waitingHead]!)) this.waitingHead++;
    return this.taken === this.seenWritten;
  }

  refresh(): void {
    const status = this.status;
    if (status === null) return;
    const written = status.written[0]!;
    if (written === this.seenWritten) return;
    sentInAll += written - this.seenWritten;
    this.seenWritten = written;
    let head = this.ringHead;
    while (head < this.ring.length && this.ring[head]!.end <= written) head++;
    if (head === this.ring.length) {
      this.ring = [];
      this.ringHead = 0;
    } else if (head > 256 && head * 2 > this.ring.length) {
      this.ring = this.ring.slice(head);
      this.ringHead = 0;
    } else {
      this.ringHead = head;
    }
  }

  private push(pending: Pending): boolean {
    // A small typed array keeps its bytes inside the engine's own cell until
    // its buffer is asked for, and then moves them: asked for here, they
    // stay where the thread reads them.
    if (pending.bytes.byteLength <= SMALL_ARRAY_BYTES) void pending.bytes.buffer;
    if (native!.sgm_sender_push(this.handle, ptr(pending.bytes), pending.bytes.length) === 0) return false;
    this.ring.push(pending);
    return true;
  }

  /** The sender thread reached what was asked, or failed. */
  private wake(): void {
    const status = this.status;
    if (status === null) return;
    if (status.error[0] !== 0) {
      if (!this.failed) {
        this.failed = true;
        this.onError(status.error[0]!);
      }
      return;
    }
    this.refresh();
    while (this.waitingHead < this.waiting.length && this.push(this.waiting[this.waitingHead]!)) this.waitingHead++;
    if (this.waitingHead === this.waiting.length) {
      this.waiting = [];
      this.waitingHead = 0;
    }
    if (this.seenWritten >= this.wakeTarget) {
      this.wakeTarget = Infinity;
      this.onProgress();
    }
    this.askToWake();
  }

  /** Asks the thread for a wake at the nearest point something waits for. */
  private askToWake(): void {
    if (this.status === null || this.failed) return;
    let at = this.wakeTarget;
    // room in the ring: half of what is in it written
    if (this.waitingHead < this.waiting.length) at = Math.min(at, this.ring[this.ringHead + Math.floor((this.ring.length - this.ringHead) / 2)]?.end ?? 0);
    if (at === Infinity) return;
    this.refresh();
    if (at <= this.seenWritten || native!.sgm_sender_wake_at(this.handle, at) === 1) queueMicrotask(() => this.wake());
  }
}
