// An authenticated, framed, backpressured TCP connection between two sgm
// processes, on Bun's own sockets.
//
// Bun's socket write() is unbuffered: it hands what the kernel takes to the
// kernel and returns how much that was. So every connection keeps its own
// send queue, refilled from the `drain` callback, and exposes its length
// (queuedBytes, whenWritable) as the backpressure signal the engines use.

import type { Socket, SocketHandler } from "bun";
import { SgmError } from "../errors.ts";
import { noteReceived } from "../net/garbage.ts";
import { formatHostPort as formatAddress } from "../net/host-port.ts";
import { receiveWaiting, socketErrnoReason, socketFd } from "../net/socket-receive.ts";
import { scribbleHandled } from "../test-faults.ts";
import { ClientHandshake, handshakeMaxPayload, type HandshakeStep, type Role, type ServerHandshake } from "./auth.ts";
import { FIRST_APP_FRAME_TYPE, FRAME_HEADER_BYTES, FrameDecoder, type FrameHandler, type MaxPayload } from "./frames.ts";
import { SendQueue } from "./send-queue.ts";
import { connectError, peerError, socketError, tlsReason } from "./socket-errors.ts";

export const DEFAULT_MAX_QUEUED = 4 << 20;

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

/** A connection made for a socket a listener accepted, and its authentication. */
export interface AcceptedPeer {
  conn: PeerConnection;
  /** Resolves once the peer has authenticated; rejects if the connection ends first. */
  authenticated: Promise<void>;
}

type Phase = "handshake" | "open" | "closing" | "closed";

interface HeldFrame {
  type: number;
  payload: Uint8Array;
}

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
  /** No TLS: what waits on the socket may be read past Bun's socket (net/socket-receive.ts). */
  private readonly plain: boolean;
  private handler: FrameHandler | undefined;
  private readPaused = false;
  private held: (HeldFrame | undefined)[] = [];
  private heldHead = 0;
  private replayScheduled = false;
  private received = 0;

  // Send side.
  private readonly sendQueue = new SendQueue();

  private constructor(remoteAddress: string, handshake: ClientHandshake | ServerHandshake, maxPayload: MaxPayload, plain: boolean) {
    this.remoteAddress = remoteAddress;
    this.plain = plain;
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
    const conn = new PeerConnection(address, handshake, options.maxPayload, !options.tls);
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
        socket: tls ? PeerConnection.socketHandlers(() => {}, attach) : PeerConnection.socketHandlers(attach),
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

  /** Takes over a socket a listener accepted (over TLS unless `plain`); the peer authenticates with `handshake`. */
  static accept(socket: Socket<PeerConnection>, address: string, handshake: ServerHandshake, maxPayload: MaxPayload, plain: boolean): AcceptedPeer {
    const conn = new PeerConnection(address, handshake, maxPayload, plain);
    socket.data = conn;
    conn.attach(socket);
    return { conn, authenticated: conn.ready };
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
    return this.sendQueue.queuedBytes;
  }

  /** Frame bytes (headers and payloads) handed to the kernel after authentication. */
  get bytesSent(): number {
    return this.sendQueue.sentBytes;
  }

  /** Frame bytes accepted by send() after authentication: where the last frame sent ends in the stream. */
  get bytesAccepted(): number {
    return this.sendQueue.acceptedBytes;
  }

  /** Frame bytes (headers and payloads) received after authentication. */
  get bytesReceived(): number {
    return this.received;
  }

  /**
   * Queues one frame. Throws once the connection is closing or closed.
   * Right after the call, bytesAccepted is where this frame ends in the
   * stream; once bytesSent reaches that, the connection holds no reference
   * to `payload` and the caller may reuse it.
   */
  send(type: number, payload: Uint8Array): void {
    this.checkSendable();
    this.sendQueue.queueFrame(type, [payload]);
  }

  /** Queues one frame whose payload is the concatenation of `parts`, without joining them first. */
  sendParts(type: number, parts: readonly Uint8Array[]): void {
    this.checkSendable();
    this.sendQueue.queueFrame(type, parts);
  }

  /**
   * Resolves once at most `maxQueued` bytes wait to be handed to the kernel;
   * rejects if the connection closes first. Senders of many small frames
   * save a promise per frame by awaiting it only when queuedBytes is above
   * their bound.
   */
  whenWritable(maxQueued = DEFAULT_MAX_QUEUED): Promise<void> {
    if (this.phase === "closed" || this.phase === "closing") return Promise.reject(this.notOpenError());
    return this.sendQueue.whenQueuedAtMost(maxQueued);
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
    this.sendQueue.rejectWaiters(this.notOpenError());
    this.sendQueue.shutDownOnceSent();
  }

  /** Closes at once, dropping what is queued; `closed` resolves with `reason`. */
  abort(reason?: Error): void {
    if (this.phase === "closed") return;
    this.finish(reason);
    this.socket?.end();
  }

  // ---- socket events (through socketHandlers()) ----

  private attach(socket: Socket<PeerConnection>): void {
    if (this.phase === "closed") {
      socket.end(); // timed out while Bun was still connecting
      return;
    }
    this.socket = socket;
    this.sendQueue.attach(socket);
    socket.setNoDelay(true);
    if (this.handshake instanceof ClientHandshake) {
      const hello = this.handshake.hello();
      this.sendQueue.queueFrame(hello.type, [hello.payload], true);
    }
  }

  /** Accepts one chunk from the socket. */
  private onData(chunk: Uint8Array): void {
    if (this.phase === "closed") return;
    noteReceived(chunk.length);
    try {
      this.decoder.feed(chunk);
      scribbleHandled(chunk);
      // what else waits is read into sgm's own buffer, while frames are wanted now
      if (this.plain) receiveWaiting(socketFd(this.socket), this.remoteAddress, this.feedReceived, this.takesFramesNow);
    } catch (err) {
      this.abort(peerError(this.remoteAddress, err));
    }
  }

  private readonly feedReceived = (bytes: Uint8Array): void => {
    noteReceived(bytes.length);
    this.decoder.feed(bytes);
  };

  /** Authenticated, and a handler takes frames as they come: none held, reading not paused. */
  private readonly takesFramesNow = (): boolean => this.phase === "open" && this.handler !== undefined && !this.readPaused && this.heldHead === this.held.length;

  private onDrain(): void {
    this.sendQueue.drained();
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
    for (const frame of step.send) this.sendQueue.queueFrame(frame.type, [frame.payload], true);
    if (step.state === "failed") {
      this.sendQueue.flush(); // best effort: the AUTH_FAILED, if any, goes out before we close
      this.abort(step.error);
    } else if (step.state === "done") {
      this.authenticatedRole = step.peerRole;
      this.decoder.setMaxPayload(this.appMaxPayload);
      this.phase = "open";
      // frames from here on are written on a thread of their own (net/socket-send.ts)
      if (this.plain) this.sendQueue.writeNatively(socketFd(this.socket), (errno) => this.abort(new SgmError("unavailable", `${this.remoteAddress}: ${socketErrnoReason(errno)}`)));
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
      this.abort(peerError(this.remoteAddress, err));
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

  // ---- ending ----

  private finish(reason: Error | undefined): void {
    if (this.phase === "closed") return;
    const wasAuthenticating = this.phase === "handshake";
    this.phase = "closed";
    this.closeReason = reason;
    this.sendQueue.drop(this.notOpenError());
    this.held = [];
    this.heldHead = 0;
    if (wasAuthenticating) {
      this.settleReady(reason ?? new SgmError("unavailable", `${this.remoteAddress}: connection closed during authentication`));
    }
    this.resolveClosed(reason);
  }

  private notOpenError(): Error {
    return this.closeReason ?? new SgmError("unavailable", `${this.remoteAddress}: connection is closed`);
  }

  /**
   * Bun's socket callbacks, shared by every connection: each socket's data
   * is its PeerConnection. `secured` runs once TLS is up, on a TLS socket.
   */
  static socketHandlers(open: (socket: Socket<PeerConnection>) => void, secured?: (socket: Socket<PeerConnection>) => void): SocketHandler<PeerConnection> {
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
}
