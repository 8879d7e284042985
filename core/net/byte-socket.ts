// A Bun socket with the two things Bun leaves to the caller: a write queue
// (Bun's write() is unbuffered and may take only part of the data) and a way
// to wait for it to drain. Used for the migration streams to and from QEMU.
// What it reads is handed to the data handler as views valid only during the
// call.

import type { Socket } from "bun";
import { asSgmError, SgmError } from "../errors.ts";
import { scribbleHandled } from "../test-faults.ts";
import { receiveWaiting, socketFd } from "./socket-receive.ts";

export type DataHandler = (data: Uint8Array) => void;

export class ByteSocket {
  readonly label: string;
  /** Resolves once the socket is closed: undefined if cleanly, else why. */
  readonly closed: Promise<Error | undefined>;

  private socket: Socket<unknown> | null = null;
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
  bytesWritten = 0;
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

  get queuedBytes(): number {
    return this.queued;
  }

  get isOpen(): boolean {
    return !this.isClosed;
  }

  /** Takes ownership of `bytes`; they are sent in order after what is queued. */
  write(bytes: Uint8Array): void {
    if (this.isClosed || bytes.length === 0) return;
    if (this.queued === 0 && this.socket) {
      const n = this.socket.write(bytes);
      if (n > 0) this.bytesWritten += n;
      if (n === bytes.length) return;
      bytes = bytes.subarray(Math.max(n, 0));
    }
    this.queue.push(bytes);
    this.queued += bytes.length;
  }

  /** Resolves once no more than `limit` bytes wait in the queue. */
  whenWritable(limit: number): Promise<void> {
    if (this.queued <= limit) return Promise.resolve();
    if (this.isClosed) return Promise.reject(this.closedError());
    return new Promise((resolve, reject) => this.waiters.push({ limit, resolve, reject }));
  }

  pause(): void {
    this.paused = true;
    this.socket?.pause();
  }

  resume(): void {
    this.paused = false;
    this.socket?.resume();
  }

  /** Closes after the queue has drained (end) or at once (destroy). */
  end(): void {
    if (this.queued === 0) this.socket?.end();
    else this.endAfterDrain = true;
  }

  destroy(reason?: Error): void {
    if (reason && !this.closeReason) this.closeReason = reason;
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
        this.bytesWritten += n;
        this.queued -= n;
      }
      if (n < head.length) {
        if (n > 0) this.queue[0] = head.subarray(n);
        break;
      }
      this.queue.shift();
    }
    if (this.waiters.length > 0) {
      const ready = this.waiters.filter((w) => this.queued <= w.limit);
      this.waiters = this.waiters.filter((w) => this.queued > w.limit);
      for (const w of ready) w.resolve();
    }
    if (this.queued === 0 && this.endAfterDrain) socket.end();
  }

  private closedError(): Error {
    return this.closeReason ?? new SgmError("unavailable", `${this.label}: connection closed`);
  }

  private finish(): void {
    if (this.isClosed) return;
    this.isClosed = true;
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
        } catch (err) {
          // a parse error ends this stream, with the parser's message as the reason
          this.destroy(asSgmError(err));
        }
      },
      drain: () => this.flushQueue(),
      end: () => this.onEnd(),
      close: (_socket: Socket<unknown>, err?: Error) => {
        if (err && !this.closeReason) this.closeReason = new SgmError("unavailable", `${this.label}: ${err.message}`);
        this.finish();
      },
      error: (_socket: Socket<unknown>, err: Error) => {
        if (!this.closeReason) this.closeReason = new SgmError("unavailable", `${this.label}: ${err.message}`);
      },
    };
  }
}
