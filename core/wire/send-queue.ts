// The send side of a PeerConnection: frames waiting for the kernel, in order,
// and the waiters of whenWritable(). Bun's socket write() takes only what the
// kernel takes, so the rest stays here until the socket's drain event.
//
// The connection says when writing may start (attach: there is a socket),
// when its own thread may write instead (writeNatively: authenticated, and
// not over TLS), when to shut the socket down (on close, once all is sent),
// and when to stop for good (drop: the connection is gone).

import { SgmError } from "../errors.ts";
import { NativeSender, WRITE_NOW_MAX_BYTES } from "../net/socket-send.ts";
import { FRAME_HEADER_BYTES, MAX_FRAME_LENGTH, encodeFrameHeader } from "./frames.ts";

// Payloads up to this size are copied next to their header, so a run of
// small frames leaves in one write instead of one syscall per frame; larger
// ones are written from the caller's buffer.
const COPY_MAX_BYTES = 16 << 10;
const BATCH_BYTES = 64 << 10;

const NO_BYTES = new Uint8Array(0);

/** What the queue needs of a Bun socket. */
export interface FrameSocket {
  /** Returns the bytes the kernel took, or a negative number once the socket is closing. */
  write(data: Uint8Array): number;
  shutdown(): void;
}

interface Waiter {
  maxQueued: number;
  resolve: () => void;
  reject: (err: Error) => void;
}

export class SendQueue {
  private socket: FrameSocket | undefined;
  /** Once set, every byte queued goes to the kernel through it (net/socket-send.ts). */
  private sender: NativeSender | null = null;
  private nativeFd = -1;
  private onNativeError: (errno: number) => void = () => {};
  // `queue` is written in order, then the filled start of `batch`.
  // `queued` and `sent` count frames sent after authentication only.
  private queue: Uint8Array[] = [];
  private queueHead = 0;
  private batch = NO_BYTES;
  private batchFill = 0;
  private queued = 0;
  private sent = 0;
  private handshakeUnsent = 0;
  private flushScheduled = false;
  private awaitingDrain = false;
  private shutDownWhenSent = false;
  private shutDown = false;
  private dropped = false;
  private waiters: Waiter[] = [];

  /** Bytes queued and not yet handed to the kernel, handshake frames aside. */
  get queuedBytes(): number {
    return this.queued + (this.sender?.unwritten ?? 0);
  }

  /** Bytes handed to the kernel, handshake frames aside. */
  get sentBytes(): number {
    return this.sent + (this.sender?.written ?? 0);
  }

  /**
   * Bytes queued so far, handshake frames aside: where the last frame ends
   * in the stream. Read as one number: sentBytes + queuedBytes read one
   * after the other may each see a different count from the sender thread.
   */
  get acceptedBytes(): number {
    return this.sent + this.queued + (this.sender?.takenBytes ?? 0);
  }

  /** Starts writing to `socket`: nothing queued is written before. */
  attach(socket: FrameSocket): void {
    this.socket = socket;
  }

  /**
   * From here on, writes go through a thread of their own to the socket
   * `fd`, once what Bun's socket was given is written. Only after the
   * handshake: its frames are written at once, so that a refusal reaches
   * the peer before the connection closes. `onError` gets the errno of a
   * failed write.
   */
  writeNatively(fd: number, onError: (errno: number) => void): void {
    this.nativeFd = fd;
    this.onNativeError = onError;
    this.startSender();
  }

  /**
   * Queues one frame whose payload is the concatenation of `parts`.
   * Handshake frames do not count in queuedBytes and sentBytes.
   */
  queueFrame(type: number, parts: readonly Uint8Array[], handshake = false): void {
    let length = 0;
    for (const part of parts) length += part.length;
    if (length > MAX_FRAME_LENGTH) throw new SgmError("internal", `frame type ${type} of ${length} bytes is too long for the wire`);
    this.reserveBatch(FRAME_HEADER_BYTES);
    encodeFrameHeader(type, length, this.batch, this.batchFill);
    this.batchFill += FRAME_HEADER_BYTES;
    for (const part of parts) {
      if (part.length <= COPY_MAX_BYTES) {
        this.reserveBatch(part.length);
        this.batch.set(part, this.batchFill);
        this.batchFill += part.length;
      } else {
        this.sealBatch();
        this.queue.push(part);
      }
    }
    if (handshake) this.handshakeUnsent += FRAME_HEADER_BYTES + length;
    else this.queued += FRAME_HEADER_BYTES + length;
    if (!this.flushScheduled && !this.awaitingDrain) {
      this.flushScheduled = true;
      // Deferred so that frames sent in one turn of the event loop leave in as few writes as possible.
      queueMicrotask(() => this.flush());
    }
  }

  /** Resolves once at most `maxQueued` bytes are queued; the caller checks that the connection is open. */
  whenQueuedAtMost(maxQueued: number): Promise<void> {
    if (this.queuedBytes <= maxQueued) return Promise.resolve();
    const waiting = new Promise<void>((resolve, reject) => this.waiters.push({ maxQueued, resolve, reject }));
    this.sender?.wakeWhenUnwrittenAtMost(Math.max(0, maxQueued - this.queued));
    return waiting;
  }

  /** The socket's drain event: it takes writes again. */
  drained(): void {
    this.awaitingDrain = false;
    this.flush();
  }

  /** Shuts the socket down once everything queued is handed to the kernel. */
  shutDownOnceSent(): void {
    this.shutDownWhenSent = true;
    this.flush();
  }

  /** The connection is gone: forgets what is queued and writes nothing more. */
  drop(err: Error): void {
    this.dropped = true;
    this.closeSender();
    this.queue = [];
    this.queueHead = 0;
    this.rejectWaiters(err);
  }

  rejectWaiters(err: Error): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const waiter of waiters) waiter.reject(err);
  }

  /** Hands the kernel what it takes now; the rest waits for drained(). */
  flush(): void {
    this.flushScheduled = false;
    const socket = this.socket;
    if (!socket || this.dropped || this.awaitingDrain) return;
    this.sealBatch();
    if (this.sender) {
      this.flushNatively(this.sender, socket);
      return;
    }
    while (this.queueHead < this.queue.length) {
      const segment = this.queue[this.queueHead]!;
      const written = socket.write(segment);
      if (written < 0) return; // the socket is closing; its close event follows
      this.countWritten(written);
      if (written < segment.length) {
        this.queue[this.queueHead] = segment.subarray(written);
        this.awaitingDrain = true;
        break;
      }
      this.queue[this.queueHead++] = NO_BYTES;
    }
    if (this.queueHead === this.queue.length) {
      this.queue = [];
      this.queueHead = 0;
    }
    this.wakeWaiters();
    this.startSender();
    if (this.shutDownWhenSent && this.queueHead === this.queue.length && !this.shutDown) {
      this.shutDown = true;
      socket.shutdown();
    }
  }

  private flushNatively(sender: NativeSender, socket: FrameSocket): void {
    let i = this.queueHead;
    if (this.queued <= WRITE_NOW_MAX_BYTES && sender.idle) {
      for (; i < this.queue.length; i++) {
        const segment = this.queue[i]!;
        const written = socket.write(segment);
        if (written < 0) {
          this.queueHead = i; // the socket is closing; its close event follows
          return;
        }
        this.sent += written;
        this.queued -= written;
        if (written < segment.length) {
          this.queue[i] = segment.subarray(written);
          break;
        }
      }
    }
    for (; i < this.queue.length; i++) sender.write(this.queue[i]!);
    this.queue = [];
    this.queueHead = 0;
    this.queued = 0;
    this.wakeWaiters();
    if (this.shutDownWhenSent && !this.shutDown) {
      if (sender.unwritten > 0) {
        sender.wakeWhenUnwrittenAtMost(0);
        return;
      }
      this.closeSender();
      this.shutDown = true;
      socket.shutdown();
    }
  }

  /** Starts the native sender once Bun's socket has written all it was given. */
  private startSender(): void {
    if (this.nativeFd < 0 || this.sender || this.dropped || this.awaitingDrain || this.queueHead < this.queue.length || this.batchFill > 0) return;
    this.sender = NativeSender.open(
      this.nativeFd,
      () => this.flush(),
      (errno) => this.onNativeError(errno),
    );
    this.nativeFd = -1;
  }

  /** Stops the native sender, keeping its count of bytes written (up to its stop). */
  private closeSender(): void {
    if (!this.sender) return;
    this.sent += this.sender.close();
    this.sender = null;
  }

  private reserveBatch(bytes: number): void {
    if (this.batch.length - this.batchFill >= bytes) return;
    this.sealBatch();
    this.batch = new Uint8Array(Math.max(BATCH_BYTES, bytes));
  }

  /** Moves the filled start of the batch into the queue; the rest of its buffer stays for later frames. */
  private sealBatch(): void {
    if (this.batchFill === 0) return;
    this.queue.push(this.batch.subarray(0, this.batchFill));
    this.batch = this.batch.subarray(this.batchFill);
    this.batchFill = 0;
  }

  private countWritten(bytes: number): void {
    // Handshake frames were queued before any other, so they leave first.
    const handshakeBytes = Math.min(bytes, this.handshakeUnsent);
    this.handshakeUnsent -= handshakeBytes;
    this.queued -= bytes - handshakeBytes;
    this.sent += bytes - handshakeBytes;
  }

  private wakeWaiters(): void {
    if (this.waiters.length === 0) return;
    const queued = this.queuedBytes;
    const still: Waiter[] = [];
    let least = Infinity;
    for (const waiter of this.waiters) {
      if (queued <= waiter.maxQueued) waiter.resolve();
      else {
        still.push(waiter);
        least = Math.min(least, waiter.maxQueued);
      }
    }
    this.waiters = still;
    if (still.length > 0) this.sender?.wakeWhenUnwrittenAtMost(Math.max(0, least - this.queued));
  }
}
