// The listening side of the wire: accepts sockets, bounds how many peers may
// be authenticating at once, and hands over each peer that authenticates.

import type { Socket, TCPSocketListener } from "bun";
import { SgmError, asSgmError } from "../errors.ts";
import { formatHostPort as formatAddress } from "../net/host-port.ts";
import { ServerHandshake, type Role } from "./auth.ts";
import { PeerConnection, type TlsFiles } from "./connection.ts";
import type { MaxPayload } from "./frames.ts";

export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;
/**
 * Peers a listener lets authenticate at once, in all and from one host: a
 * host that opens connections and never authenticates holds at most its
 * share of sockets, each for the handshake timeout, and others still get in.
 */
export const DEFAULT_MAX_AUTHENTICATING = 1024;
export const DEFAULT_MAX_AUTHENTICATING_PER_HOST = 16;

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

/**
 * Listens for peers and hands each one that authenticates, with a role in
 * `acceptRoles`, to onConnection. Any other peer is dropped and reported to
 * onRejected, without effect on the listener or other connections.
 */
export function listenPeers(options: ListenOptions): PeerListener {
  const authenticating = new Set<PeerConnection>();
  const perHost = new Map<string, number>();
  const timeoutMs = options.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
  const maxAll = options.maxAuthenticating ?? DEFAULT_MAX_AUTHENTICATING;
  const maxPerHost = options.maxAuthenticatingPerHost ?? DEFAULT_MAX_AUTHENTICATING_PER_HOST;
  const accept = (socket: Socket<PeerConnection>): void => {
    const host = socket.remoteAddress;
    const address = formatAddress(host, socket.remotePort);
    const handshake = new ServerHandshake(options.psk, options.role, options.acceptRoles, address);
    const { conn, authenticated } = PeerConnection.accept(socket, address, handshake, options.maxPayload, !options.tls);
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
    authenticated.then(
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
    listener = Bun.listen<PeerConnection>({ hostname: options.host, port: options.port, ...(tls ? { tls } : {}), socket: PeerConnection.socketHandlers(accept) });
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
