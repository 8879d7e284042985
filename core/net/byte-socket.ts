// A Bun socket with the two things Bun leaves to the caller: a write queue
// (Bun's write() is unbuffered and may take only part of the data) and a way
// to wait for it to drain. Used for the migration streams to and from QEMU.
// What it reads is handed to the data handler as views valid only during the
// call. Once connected, it writes on a thread of its own where it can
// (net/socket-send.ts).

import type { Socket } from "bun";
import { asSgmError, SgmError } from "../errors.ts";
import { scribbleHandled } from "../test-faults.ts";
import { RECEIVE_THREAD_AFTER_BYTES, ReceiveThread, receiveWaiting, socketErrnoReason, socketFd, type ReceiveEnd } from "./socket-receive.ts";
import { NativeSender, WRITE_NOW_MAX_BYTES } from "./socket-send.ts";

export type DataHandler = (data: Uint8Array) => void;

export class ByteSocket {
  readonly label: string;
  /** Resolves once the socket is closed: undefined if cleanly, else why. */
  readonly closed: Promise<Error | undefined>;

  private socket: Socket<unknown> | null = null;
  /** Set once Bun's socket has written all it was given: every later write goes through it. */
  private sender: NativeSender | null = null;
  /**
   * Set once the stream has carried RECEIVE_THREAD_AFTER_BYTES: it reads
   * from then on, the sender writes, and Bun's socket is closed (`socket`
   * null), so that Bun can neither read the stream nor see its peer go.
   */
  private receiver: ReceiveThread | null = null;
  /** Bun's socket was closed for the receive thread: what it reports of itself from then on is not the stream's. */
  private handedOver = false;
  /** A receive thread could not start: the stream stays on Bun's socket, without trying again at every read. */
  private receiverRefused = false;
  private readonly queue: Uint8Array[] = [];
  private queued = 0;
  private waiters: Array<{ limit: number; resolve: () => void; reject: (e: Error) => void }> = [];
  private onData: DataHandler = () => {};
  private onEnd: () => void = () => {};
  private closeReason: Error | undefined;
  private isClosed = false;
  private paused = false;
  private endAfterDrain = false;
  private resolveClosed!: (reason: Error | undefined) => void;
  /** Written by Bun's socket, and by a sender since closed. */
  private written = 0;
  bytesRead = 0;

  private constructor(label: string) {
    this.label = label;
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
  }

  /** Connects to a unix socket (a destination QEMU's migrate-incoming). */
  static async connectUnix(path: string, label: string): Promise<ByteSocket> {
    const s = new ByteSocket(label);
    try {
      await Bun.connect({ unix: path, socket: s.handlers() });
    } catch (err) {
      throw new SgmError("unavailable", `${label}: cannot connect to ${path}: ${(err as Error).message}`);
    }
    return s;
  }

  /** Listens on a unix socket path for exactly one connection. */
  static listenUnixOnce(path: string, label: string): { accepted: Promise<ByteSocket>; stop: () => void } {
    const s = new ByteSocket(label);
    const accepted = Promise.withResolvers<ByteSocket>();
    const handlers = s.handlers();
    let taken = false;
    const listener = Bun.listen({
      unix: path,
      socket: {
        ...handlers,
        open(socket) {
          if (taken) {
            socket.terminate();
            return;
          }
          taken = true;
          handlers.open(socket);
          listener.stop(false);
          accepted.resolve(s);
        },
      },
    });
    return {
      accepted: accepted.promise,
      stop: () => {
        listener.stop(false);
        accepted.reject(new SgmError("unavailable", `${label}: nobody connected`));
      },
    };
  }

  setDataHandler(handler: DataHandler): void {
    this.onData = handler;
  }

  /** Called when the peer closes its sending side. */
  setEndHandler(handler: () => void): void {
    this.onEnd = handler;
  }

  /** Bytes taken by write() and not yet handed to the kernel. */
  get queuedBytes(): number {
    return this.queued + (this.sender?.unwritten ?? 0);
  }

  /** Bytes handed to the kernel. */
  get bytesWritten(): number {
    return this.written + (this.sender?.written ?? 0);
  }

  /** Bytes taken by write() in all, read as one number (not bytesWritten + queuedBytes: a sender thread may write between the two). */
  get bytesAccepted(): number {
    return this.written + this.queued + (this.sender?.takenBytes ?? 0);
  }

  get isOpen(): boolean {
    return !this.isClosed;
  }

  /** Takes ownership of `bytes`; they are sent in order after what is queued. */
  write(bytes: Uint8Array): void {
    if (this.isClosed || bytes.length === 0) return;
    if (this.sender) {
      if (bytes.length <= WRITE_NOW_MAX_BYTES && this.sender.idle && (this.socket || this.receiver)) {
        // the sender's thread is idle: a small write goes at once (net/socket-send.ts: NativeSender.idle), a postcopy page request among them
        const n = this.socket ? this.socket.write(bytes) : this.receiver!.sendNow(bytes);
        if (n > 0) this.written += n;
        if (n === bytes.length) return;
        bytes = bytes.subarray(Math.max(n, 0));
      }
      this.sender.write(bytes);
      return;
    }
    if (this.queued === 0 && this.socket) {
      const n = this.socket.write(bytes);
      if (n > 0) this.written += n;
      if (n === bytes.length) return;
      bytes = bytes.subarray(Math.max(n, 0));
    }
    this.queue.push(bytes);
    this.queued += bytes.length;
  }

  /** Resolves once no more than `limit` bytes wait in the queue. */
  whenWritable(limit: number): Promise<void> {
    if (this.queuedBytes <= limit) return Promise.resolve();
    if (this.isClosed) return Promise.reject(this.closedError());
    const waiting = new Promise<void>((resolve, reject) => this.waiters.push({ limit, resolve, reject }));
    this.sender?.wakeWhenUnwrittenAtMost(limit);
    return waiting;
  }

  pause(): void {
    this.paused = true;
    this.socket?.pause();
  }

  resume(): void {
    this.paused = false;
    this.receiver?.drainSoon();
    this.socket?.resume();
  }

  /** Closes after the queue has drained (end) or at once (destroy). */
  end(): void {
    this.endAfterDrain = true;
    this.afterWrites();
  }

  destroy(reason?: Error): void {
    if (reason && !this.closeReason) this.closeReason = reason;
    this.closeSender();
    this.socket?.terminate();
    this.finish();
  }

  private flushQueue(): void {
    const socket = this.socket;
    if (!socket) return;
    while (this.queue.length > 0) {
      const head = this.queue[0]!;
      const n = socket.write(head);
      if (n > 0) {
        this.written += n;
        this.queued -= n;
      }
      if (n < head.length) {
        if (n > 0) this.queue[0] = head.subarray(n);
        break;
      }
      this.queue.shift();
    }
    if (this.queued === 0 && !this.sender && !this.isClosed && !this.endAfterDrain) {
      this.sender = NativeSender.open(
        socketFd(socket),
        () => this.afterWrites(),
        (errno) => this.destroy(new SgmError("unavailable", `${this.label}: ${socketErrnoReason(errno)}`)),
      );
    }
    this.afterWrites();
  }

  /** Wakes whoever waits for the queue to shrink, and ends the socket once all is written if asked. */
  private afterWrites(): void {
    const queued = this.queuedBytes;
    if (this.waiters.length > 0) {
      const ready = this.waiters.filter((w) => queued <= w.limit);
      this.waiters = this.waiters.filter((w) => queued > w.limit);
      for (const w of ready) w.resolve();
      if (this.waiters.length > 0) this.sender?.wakeWhenUnwrittenAtMost(Math.min(...this.waiters.map((w) => w.limit)));
    }
    if (!this.endAfterDrain || (!this.socket && !this.receiver)) return;
    if (queued > 0) {
      this.sender?.wakeWhenUnwrittenAtMost(0);
      return;
    }
    this.closeSender();
    if (this.socket) this.socket.end();
    else {
      const errno = this.receiver!.shutdownWrite();
      if (errno !== 0) this.destroy(new SgmError("unavailable", `${this.label}: ${socketErrnoReason(errno)}`));
    }
  }

  /** Stops the native sender, keeping its count of bytes written (up to its stop). */
  private closeSender(): void {
    if (!this.sender) return;
    this.written += this.sender.close();
    this.sender = null;
  }

  private closedError(): Error {
    return this.closeReason ?? new SgmError("unavailable", `${this.label}: connection closed`);
  }

  private finish(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.receiver?.close();
    this.receiver = null;
    this.closeSender();
    this.queue.length = 0;
    this.queued = 0;
    const err = this.closedError();
    for (const w of this.waiters) w.reject(err);
    this.waiters = [];
    this.resolveClosed(this.closeReason);
  }

  private readonly feed = (data: Uint8Array): void => {
    this.bytesRead += data.length;
    this.onData(data);
  };

  private readonly reading = (): boolean => !this.paused && !this.isClosed;

  /**
   * The stream is a bulk one: a thread reads it from here on, with its own
   * descriptor, and Bun's socket is closed before the event loop turns.
   * Writes go through the sender (its own descriptor too), so there must be one.
   */
  private startReceiver(socket: Socket<unknown>): void {
    if (!this.sender) return;
    const receiver = ReceiveThread.open(socketFd(socket), this.label, this.feedFromThread, this.reading, this.receiverEnded);
    if (!receiver) {
      this.receiverRefused = true;
      return;
    }
    this.receiver = receiver;
    this.socket = null;
    this.handedOver = true;
    // the socket lives on in the threads' descriptors
    socket.terminate();
  }

  private readonly feedFromThread = (data: Uint8Array): void => {
    try {
      this.feed(data);
    } catch (err) {
      // a parse error ends this stream, with the parser's message as the reason
      this.destroy(asSgmError(err));
    }
  };

  /** The thread read the peer's end, or failed: what Bun's end and close, or its error, said before. */
  private readonly receiverEnded = (end: ReceiveEnd): void => {
    if (end.error) {
      this.destroy(end.error);
      return;
    }
    this.onEnd();
    // as Bun's socket did after the peer's end (no half-open sockets): closed
    this.finish();
  };

  private handlers() {
    return {
      binaryType: "uint8array" as const,
      open: (socket: Socket<unknown>) => {
        this.socket = socket;
        this.flushQueue();
      },
      data: (socket: Socket<unknown>, data: Uint8Array) => {
        try {
          this.feed(data);
          scribbleHandled(data);
          // what else waits is read into sgm's own buffer (unix sockets: no TLS), while reading is wanted
          receiveWaiting(socketFd(socket), this.label, this.feed, this.reading);
          if (!this.receiver && !this.receiverRefused && !this.isClosed && this.bytesRead >= RECEIVE_THREAD_AFTER_BYTES) this.startReceiver(socket);
        } catch (err) {
          // a parse error ends this stream, with the parser's message as the reason
          this.destroy(asSgmError(err));
        }
      },
      drain: () => this.flushQueue(),
      end: () => {
        if (!this.handedOver) this.onEnd();
      },
      // once a thread reads, Bun's socket is closed by startReceiver and says nothing more of the stream
      close: (_socket: Socket<unknown>, err?: Error) => {
        if (this.handedOver) return;
        if (err && !this.closeReason) this.closeReason = new SgmError("unavailable", `${this.label}: ${err.message}`);
        this.finish();
      },
      error: (_socket: Socket<unknown>, err: Error) => {
        if (this.handedOver) return;
        if (!this.closeReason) this.closeReason = new SgmError("unavailable", `${this.label}: ${err.message}`);
      },
    };
  }
}
