// An authenticated, framed, backpressured TCP connection between two sgm
// processes, on Bun's own sockets.
//
// Bun's socket write() is unbuffered: it hands what the kernel takes to the
// kernel and returns how much that was. So every connection keeps its own
// send queue, refilled from the `drain` callback, and exposes its length
// (queuedBytes, whenWritable) as the backpressure signal the engines use.

import type { Socket, SocketHandler, TCPSocketListener } from "bun";
import { SgmError, asSgmError } from "../errors.ts";
import { noteReceived } from "../net/garbage.ts";
import { formatHostPort as formatAddress } from "../net/host-port.ts";
import { ClientHandshake, ServerHandshake, handshakeMaxPayload, type HandshakeStep, type Role } from "./auth.ts";
import {
  FIRST_APP_FRAME_TYPE,
  FRAME_HEADER_BYTES,
  FrameDecoder,
  MAX_FRAME_LENGTH,
  encodeFrameHeader,
  type FrameHandler,
  type MaxPayload,
} from "./frames.ts";

export const DEFAULT_MAX_QUEUED = 4 << 20;
export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;
/**
 * Peers a listener lets authenticate at once, in all and from one host: a
 * host that opens connections and never authenticates holds at most its
 * share of sockets, each for the handshake timeout, and others still get in.
 */
export const DEFAULT_MAX_AUTHENTICATING = 1024;
export const DEFAULT_MAX_AUTHENTICATING_PER_HOST = 16;

// Payloads up to this size are copied next to their header, so a run of
// small frames leaves in one write instead of one syscall per frame; larger
// ones are written from the caller's buffer.
const COPY_MAX_BYTES = 16 << 10;
const BATCH_BYTES = 64 << 10;

/**
 * Mutual TLS under the PSK proof, as PEM text: this side's certificate and
 * key, and the CA every peer's certificate must be signed by.
 */
export interface TlsFiles {
  cert: string;
  key: string;
  ca: string;
}

export interface ConnectOptions {
  host: string;
  port: number;
  psk: Uint8Array;
  tls?: TlsFiles | null;
  role: Role;
  /** Fail unless the server has this role (e.g. --to must name a gather). */
  expectRole?: Role;
  /** Bounds for frame types from 16 up; types below 16 are the wire's own. */
  maxPayload: MaxPayload;
  /** Bound on connecting plus authenticating. */
  timeoutMs: number;
}

export interface ListenOptions {
  host: string;
  port: number;
  psk: Uint8Array;
  tls?: TlsFiles | null;
  role: Role;
  acceptRoles: readonly Role[];
  maxPayload: MaxPayload;
  handshakeTimeoutMs?: number;
  maxAuthenticating?: number;
  maxAuthenticatingPerHost?: number;
  /** Called with each authenticated connection; it belongs to the callee from then on. */
  onConnection(conn: PeerConnection): void;
  /** Called for each peer dropped before or during authentication. */
  onRejected?(address: string, err: SgmError): void;
}

export interface PeerListener {
  readonly port: number;
  /** Stops accepting and drops peers still authenticating; authenticated connections stay open. */
  close(): void;
}

type Phase = "handshake" | "open" | "closing" | "closed";

interface Waiter {
  maxQueued: number;
  resolve: () => void;
  reject: (err: Error) => void;
}

interface HeldFrame {
  type: number;
  payload: Uint8Array;
}

const NO_BYTES = new Uint8Array(0);

/**
 * Frames are delivered to the single handler set with onFrame(). Until it is
 * set, and while reading is paused, arriving frames are held (copied) and the
 * socket stops reading, so nothing is lost and at most one socket read's
 * worth is held.
 *
 * A payload given to send() is written from the caller's buffer when it is
 * large: do not modify it after send(). A frame payload received must be
 * copied to outlive the handler call, including to forward it with send().
 */
export class PeerConnection {
  readonly remoteAddress: string;
  /** Resolves when the connection is gone: undefined for a clean close by either side, else why. */
  readonly closed: Promise<Error | undefined>;

  private socket: Socket<PeerConnection> | undefined;
  private phase: Phase = "handshake";
  private readonly handshake: ClientHandshake | ServerHandshake;
  private authenticatedRole: Role | undefined;
  private readonly appMaxPayload: MaxPayload;
  private readonly decoder: FrameDecoder;
  private readonly ready: Promise<void>;
  private settleReady!: (err?: Error) => void;
  private resolveClosed!: (reason: Error | undefined) => void;
  private closeReason: Error | undefined;

  // Receive side.
  private handler: FrameHandler | undefined;
  private readPaused = false;
  private held: (HeldFrame | undefined)[] = [];
  private heldHead = 0;
  private replayScheduled = false;
  private received = 0;

  // Send side: `queue` is written in order, then the filled start of `batch`.
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
  private shutDown = false;
  private waiters: Waiter[] = [];

  private constructor(remoteAddress: string, handshake: ClientHandshake | ServerHandshake, maxPayload: MaxPayload) {
    this.remoteAddress = remoteAddress;
    this.handshake = handshake;
    this.appMaxPayload = (type) => (type < FIRST_APP_FRAME_TYPE ? undefined : maxPayload(type));
    this.decoder = new FrameDecoder(handshakeMaxPayload, (type, payload) => this.onDecodedFrame(type, payload));
    this.ready = new Promise<void>((resolve, reject) => {
      this.settleReady = (err) => (err ? reject(err) : resolve());
    });
    this.ready.catch(() => {}); // whoever waits sees it; nobody waiting is fine too
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
  }

  /** Connects, authenticates, and resolves with the connection ready for frames. */
  static async connect(options: ConnectOptions): Promise<PeerConnection> {
    const address = formatAddress(options.host, options.port);
    const handshake = new ClientHandshake(options.psk, options.role, address, options.expectRole);
    const conn = new PeerConnection(address, handshake, options.maxPayload);
    const timer = setTimeout(() => {
      const what = conn.socket ? "authentication" : "connection";
      conn.abort(new SgmError("unavailable", `${address}: ${what} timed out after ${options.timeoutMs} ms`));
    }, options.timeoutMs);
    try {
      const attach = (socket: Socket<PeerConnection>) => socket.data.attach(socket);
      const tls = options.tls ? { cert: options.tls.cert, key: options.tls.key, ca: options.tls.ca, rejectUnauthorized: true } : undefined;
      const connecting = Bun.connect<PeerConnection>({
        hostname: options.host,
        port: options.port,
        data: conn,
        ...(tls ? { tls } : {}),
        // over TLS the PSK proof starts once TLS is up: bytes written before are not delivered
        socket: tls ? PeerConnection.handlers(() => {}, attach) : PeerConnection.handlers(attach),
      });
      // The timer aborts the connection, which rejects `ready`, even while Bun is still connecting.
      await Promise.race([connecting.catch((err) => Promise.reject(connectError(address, err))), conn.ready]);
      await conn.ready;
      return conn;
    } catch (err) {
      const error = err instanceof SgmError ? err : connectError(address, err);
      conn.abort(error);
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  get peerRole(): Role {
    if (this.authenticatedRole === undefined) throw new SgmError("internal", `${this.remoteAddress}: peer role asked before authentication`);
    return this.authenticatedRole;
  }

  /** Frames may be sent: authenticated and not closing. */
  get isOpen(): boolean {
    return this.phase === "open";
  }

  /** Bytes accepted by send() and not yet handed to the kernel. */
  get queuedBytes(): number {
    return this.queued;
  }

  /** Frame bytes (headers and payloads) handed to the kernel after authentication. */
  get bytesSent(): number {
    return this.sent;
  }

  /** Frame bytes (headers and payloads) received after authentication. */
  get bytesReceived(): number {
    return this.received;
  }

  /**
   * Queues one frame. Throws once the connection is closing or closed.
   * Right after the call, bytesSent + queuedBytes is where this frame ends
   * in the stream; once bytesSent reaches that, the connection holds no
   * reference to `payload` and the caller may reuse it.
   */
  send(type: number, payload: Uint8Array): void {
    this.checkSendable();
    this.queueFrame(type, [payload]);
  }

  /** Queues one frame whose payload is the concatenation of `parts`, without joining them first. */
  sendParts(type: number, parts: readonly Uint8Array[]): void {
    this.checkSendable();
    this.queueFrame(type, parts);
  }

  /**
   * Resolves once at most `maxQueued` bytes wait to be handed to the kernel;
   * rejects if the connection closes first. Senders of many small frames
   * save a promise per frame by awaiting it only when queuedBytes is above
   * their bound.
   */
  whenWritable(maxQueued = DEFAULT_MAX_QUEUED): Promise<void> {
    if (this.phase === "closed" || this.phase === "closing") return Promise.reject(this.notOpenError());
    if (this.queued <= maxQueued) return Promise.resolve();
    return new Promise((resolve, reject) => this.waiters.push({ maxQueued, resolve, reject }));
  }

  /**
   * Sets the one frame handler. A handler that throws closes the connection,
   * and `closed` resolves with what it threw.
   */
  onFrame(handler: FrameHandler): void {
    this.handler = handler;
    this.scheduleReplay();
  }

  /** Stops delivering frames (and reading the socket) until resumeReading(). */
  pauseReading(): void {
    this.readPaused = true;
    this.socket?.pause();
  }

  resumeReading(): void {
    this.readPaused = false;
    this.scheduleReplay();
  }

  /**
   * Closes once everything queued is handed to the kernel; frames the peer
   * still sends until it closes too are delivered. `closed` resolves when
   * the peer has closed its side, which a peer that stopped reading never
   * does: abort() then.
   */
  close(): void {
    if (this.phase !== "open") return;
    this.phase = "closing";
    this.rejectWaiters(this.notOpenError());
    this.flush();
  }

  /** Closes at once, dropping what is queued; `closed` resolves with `reason`. */
  abort(reason?: Error): void {
    if (this.phase === "closed") return;
    this.finish(reason);
    this.socket?.end();
  }

  // ---- socket events (through handlers()) ----

  private attach(socket: Socket<PeerConnection>): void {
    if (this.phase === "closed") {
      socket.end(); // timed out while Bun was still connecting
      return;
    }
    this.socket = socket;
    socket.setNoDelay(true);
    if (this.handshake instanceof ClientHandshake) {
      const hello = this.handshake.hello();
      this.queueFrame(hello.type, [hello.payload], true);
    }
  }

  /** Accepts one chunk from the socket. */
  private onData(chunk: Uint8Array): void {
    if (this.phase === "closed") return;
    noteReceived(chunk.length);
    try {
      this.decoder.feed(chunk);
    } catch (err) {
      this.abort(this.peerError(err));
    }
  }

  private onDrain(): void {
    this.awaitingDrain = false;
    this.flush();
  }

  private onSocketClosed(err: Error | undefined): void {
    if (this.phase === "closed") return;
    if (err) this.finish(socketError(this.remoteAddress, err));
    else if (this.decoder.midFrame) this.finish(new SgmError("unavailable", `${this.remoteAddress}: connection closed in the middle of a frame`));
    else this.finish(undefined);
  }

  // ---- receiving ----

  private onDecodedFrame(type: number, payload: Uint8Array): void {
    if (this.phase === "closed") return;
    if (this.phase === "handshake") {
      this.advanceHandshake(this.handshake.receive(type, payload));
      return;
    }
    this.received += FRAME_HEADER_BYTES + payload.length;
    if (this.handler && !this.readPaused && this.heldHead === this.held.length) {
      this.handler(type, payload);
      return;
    }
    this.held.push({ type, payload: payload.slice() });
    this.socket?.pause();
  }

  private advanceHandshake(step: HandshakeStep): void {
    for (const frame of step.send) this.queueFrame(frame.type, [frame.payload], true);
    if (step.state === "failed") {
      this.flush(); // best effort: the AUTH_FAILED, if any, goes out before we close
      this.abort(step.error);
    } else if (step.state === "done") {
      this.authenticatedRole = step.peerRole;
      this.decoder.setMaxPayload(this.appMaxPayload);
      this.phase = "open";
      this.settleReady();
    }
  }

  private scheduleReplay(): void {
    if (this.replayScheduled || this.phase === "closed") return;
    this.replayScheduled = true;
    // Not synchronously: onFrame() and resumeReading() must not call the handler from inside themselves.
    queueMicrotask(() => this.replay());
  }

  private replay(): void {
    this.replayScheduled = false;
    try {
      while (this.heldHead < this.held.length && this.handler && !this.readPaused && this.phase !== "closed") {
        const frame = this.held[this.heldHead]!;
        this.held[this.heldHead++] = undefined;
        this.handler(frame.type, frame.payload);
      }
    } catch (err) {
      this.abort(this.peerError(err));
      return;
    }
    if (this.heldHead < this.held.length || !this.handler || this.readPaused) return;
    this.held = [];
    this.heldHead = 0;
    this.socket?.resume();
  }

  // ---- sending ----

  private checkSendable(): void {
    if (this.phase !== "open") throw this.notOpenError();
  }

  private queueFrame(type: number, parts: readonly Uint8Array[], handshake = false): void {
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

  private flush(): void {
    this.flushScheduled = false;
    const socket = this.socket;
    if (!socket || this.phase === "closed" || this.awaitingDrain) return;
    this.sealBatch();
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
    if (this.phase === "closing" && this.queueHead === this.queue.length && !this.shutDown) {
      this.shutDown = true;
      socket.shutdown();
    }
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
    const still: Waiter[] = [];
    for (const waiter of this.waiters) {
      if (this.queued <= waiter.maxQueued) waiter.resolve();
      else still.push(waiter);
    }
    this.waiters = still;
  }

  private rejectWaiters(err: Error): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const waiter of waiters) waiter.reject(err);
  }

  // ---- ending ----

  private finish(reason: Error | undefined): void {
    if (this.phase === "closed") return;
    const wasAuthenticating = this.phase === "handshake";
    this.phase = "closed";
    this.closeReason = reason;
    this.queue = [];
    this.queueHead = 0;
    this.held = [];
    this.heldHead = 0;
    this.rejectWaiters(this.notOpenError());
    if (wasAuthenticating) {
      this.settleReady(reason ?? new SgmError("unavailable", `${this.remoteAddress}: connection closed during authentication`));
    }
    this.resolveClosed(reason);
  }

  private notOpenError(): Error {
    return this.closeReason ?? new SgmError("unavailable", `${this.remoteAddress}: connection is closed`);
  }

  /** A decoder or handler error, tied to the peer whose bytes caused it. */
  private peerError(err: unknown): SgmError {
    const error = asSgmError(err);
    if (error.kind !== "data" || error.message.startsWith(`${this.remoteAddress}:`)) return error;
    return new SgmError("data", `${this.remoteAddress}: ${error.message}`, { cause: error });
  }

  /**
   * Bun's socket callbacks, shared by every connection: each socket's data
   * is its PeerConnection. `secured` runs once TLS is up, on a TLS socket.
   */
  private static handlers(open: (socket: Socket<PeerConnection>) => void, secured?: (socket: Socket<PeerConnection>) => void): SocketHandler<PeerConnection> {
    return {
      binaryType: "uint8array",
      open,
      handshake: (socket, success, refused) => {
        if (refused || !success) socket.data?.abort(new SgmError("unavailable", `${socket.data.remoteAddress}: TLS refused: ${refused ? tlsReason(refused) : "handshake failed"}`));
        else secured?.(socket);
      },
      data: (socket, chunk: Uint8Array) => socket.data?.onData(chunk),
      drain: (socket) => socket.data?.onDrain(),
      close: (socket, err) => socket.data?.onSocketClosed(err),
      error: (socket, err) => socket.data?.abort(socketError(socket.data.remoteAddress, err)),
    };
  }

  /** See listenPeers. */
  static listen(options: ListenOptions): PeerListener {
    const authenticating = new Set<PeerConnection>();
    const perHost = new Map<string, number>();
    const timeoutMs = options.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
    const maxAll = options.maxAuthenticating ?? DEFAULT_MAX_AUTHENTICATING;
    const maxPerHost = options.maxAuthenticatingPerHost ?? DEFAULT_MAX_AUTHENTICATING_PER_HOST;
    const accept = (socket: Socket<PeerConnection>): void => {
      const host = socket.remoteAddress;
      const address = formatAddress(host, socket.remotePort);
      const handshake = new ServerHandshake(options.psk, options.role, options.acceptRoles, address);
      const conn = new PeerConnection(address, handshake, options.maxPayload);
      socket.data = conn;
      conn.attach(socket);
      const fromHost = perHost.get(host) ?? 0;
      if (authenticating.size >= maxAll || fromHost >= maxPerHost) {
        const why = fromHost >= maxPerHost ? `${fromHost} peers from ${host} are` : `${authenticating.size} peers are`;
        const err = new SgmError("unavailable", `${address}: dropped: ${why} authenticating already`);
        conn.abort(err);
        options.onRejected?.(address, err);
        return;
      }
      perHost.set(host, fromHost + 1);
      authenticating.add(conn);
      const done = () => {
        authenticating.delete(conn);
        const left = (perHost.get(host) ?? 1) - 1;
        if (left > 0) perHost.set(host, left);
        else perHost.delete(host);
      };
      const timer = setTimeout(() => {
        conn.abort(new SgmError("unavailable", `${address}: authentication timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      conn.ready.then(
        () => {
          clearTimeout(timer);
          done();
          try {
            options.onConnection(conn);
          } catch (err) {
            conn.abort(asSgmError(err));
          }
        },
        (err: unknown) => {
          clearTimeout(timer);
          done();
          options.onRejected?.(address, asSgmError(err));
        },
      );
    };
    let listener: TCPSocketListener<PeerConnection>;
    try {
      const tls = options.tls ? { cert: options.tls.cert, key: options.tls.key, ca: options.tls.ca, requestCert: true, rejectUnauthorized: true } : undefined;
      listener = Bun.listen<PeerConnection>({ hostname: options.host, port: options.port, ...(tls ? { tls } : {}), socket: PeerConnection.handlers(accept) });
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      const why = code === "EADDRINUSE" ? "address already in use" : code === "EACCES" ? "permission denied" : (err as Error).message;
      throw new SgmError("unavailable", `cannot listen on ${formatAddress(options.host, options.port)}: ${why}`, { cause: err });
    }
    return {
      port: listener.port,
      close() {
        listener.stop(false);
        for (const conn of authenticating) conn.abort(new SgmError("unavailable", `${conn.remoteAddress}: listener closed during authentication`));
      },
    };
  }
}

/**
 * Listens for peers and hands each one that authenticates, with a role in
 * `acceptRoles`, to onConnection. Any other peer is dropped and reported to
 * onRejected, without effect on the listener or other connections.
 */
export function listenPeers(options: ListenOptions): PeerListener {
  return PeerConnection.listen(options);
}

function connectError(address: string, err: unknown): SgmError {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  const why =
    code === "ECONNREFUSED"
      ? "connection refused"
      : code === "ENOTFOUND" || code === "EAI_AGAIN"
        ? "cannot resolve host name"
        : code === "ETIMEDOUT"
          ? "connection timed out"
          : code === "EHOSTUNREACH" || code === "ENETUNREACH"
            ? "host unreachable"
            : err instanceof Error
              ? err.message
              : String(err);
  return new SgmError("unavailable", `${address}: ${why}`, { cause: err });
}

/** A certificate refused, by its OpenSSL code when there is one (CERT_HAS_EXPIRED, DEPTH_ZERO_SELF_SIGNED_CERT, ...). */
function tlsReason(err: Error): string {
  const code = (err as NodeJS.ErrnoException).code;
  return code ? `${code} (${err.message})` : err.message;
}

function socketError(address: string, err: Error): SgmError {
  const code = (err as NodeJS.ErrnoException).code;
  const why = code === "ECONNRESET" ? "connection reset by peer" : code === "EPIPE" ? "connection closed by peer" : err.message;
  return new SgmError("unavailable", `${address}: ${why}`, { cause: err });
}
