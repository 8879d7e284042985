// Pre-shared-key mutual authentication, the first exchange on every sgm
// connection. Each side proves it knows the key with an HMAC over both
// random nonces and both roles, so neither a replayed nor a reflected proof
// is accepted, and the key itself never crosses the wire.
//
//   client -> HELLO       u8 client role, 32-byte nonce_c
//   server -> CHALLENGE   u8 server role, 32-byte nonce_s, 32-byte mac_s
//   client -> PROOF       32-byte mac_c
//   server -> WELCOME     (empty)
// The side that finds something wrong sends AUTH_FAILED (utf8 reason) and closes.
//
// The handshake classes here only compute frames and verdicts; connection.ts
// moves the bytes.

import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";
import { SgmError } from "../errors.ts";

export const FRAME_HELLO = 1;
export const FRAME_CHALLENGE = 2;
export const FRAME_PROOF = 3;
export const FRAME_WELCOME = 4;
export const FRAME_AUTH_FAILED = 5;

/** Bound on every handshake payload, so an unauthenticated peer costs almost nothing. */
export const HANDSHAKE_MAX_PAYLOAD = 256;

export const MIN_PSK_BYTES = 16;
const NONCE_BYTES = 32;
const MAC_BYTES = 32;

export type Role = "scatter" | "relay" | "gather";

export const ROLE_CODES: Readonly<Record<Role, number>> = { scatter: 1, relay: 2, gather: 3 };

export function roleFromCode(code: number): Role | undefined {
  for (const role of Object.keys(ROLE_CODES) as Role[]) if (ROLE_CODES[role] === code) return role;
  return undefined;
}

/** The frame bounds while a connection is not yet authenticated. */
export function handshakeMaxPayload(type: number): number | undefined {
  return type >= FRAME_HELLO && type <= FRAME_AUTH_FAILED ? HANDSHAKE_MAX_PAYLOAD : undefined;
}

/** Reads a key file; trailing whitespace (an editor's newline) is not part of the key. */
export function loadPsk(path: string): Uint8Array {
  let bytes: Uint8Array;
  try {
    bytes = readFileSync(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why =
      code === "ENOENT" ? "no such file" : code === "EACCES" ? "permission denied" : code === "EISDIR" ? "is a directory" : (err as Error).message;
    throw new SgmError("usage", `--psk-file '${path}': ${why}`, { cause: err });
  }
  let end = bytes.length;
  while (end > 0 && isWhitespace(bytes[end - 1]!)) end--;
  if (end < MIN_PSK_BYTES) {
    throw new SgmError("usage", `--psk-file '${path}': key is ${end} bytes, at least ${MIN_PSK_BYTES} are required`);
  }
  return new Uint8Array(bytes.subarray(0, end));
}

function isWhitespace(byte: number): boolean {
  return byte === 0x20 || byte === 0x09 || byte === 0x0a || byte === 0x0d || byte === 0x0b || byte === 0x0c;
}

export interface OutFrame {
  type: number;
  payload: Uint8Array;
}

/**
 * What one received handshake frame leads to: frames to send, and then
 * either nothing more (wait for the next frame), success, or failure. On
 * failure `send` carries the AUTH_FAILED for the peer, if one is due.
 */
export type HandshakeStep =
  | { state: "continue"; send: OutFrame[] }
  | { state: "done"; send: OutFrame[]; peerRole: Role }
  | { state: "failed"; send: OutFrame[]; error: SgmError };


export class ClientHandshake {
  private readonly nonce = randomBytes(NONCE_BYTES);
  private serverRole: Role | undefined;

  constructor(
    private readonly psk: Uint8Array,
    private readonly role: Role,
    /** Where the peer is, for messages. */
    private readonly peer: string,
    /** The role the server must have, when the caller knows it. */
    private readonly expectRole?: Role,
  ) {}

  hello(): OutFrame {
    return { type: FRAME_HELLO, payload: concat([Uint8Array.of(ROLE_CODES[this.role]), this.nonce]) };
  }

  receive(type: number, payload: Uint8Array): HandshakeStep {
    if (type === FRAME_AUTH_FAILED) return rejected(this.peer, payload);
    if (this.serverRole === undefined) {
      if (type !== FRAME_CHALLENGE || payload.length !== 1 + NONCE_BYTES + MAC_BYTES) {
        return refuse(this.peer, `expected a CHALLENGE frame of ${1 + NONCE_BYTES + MAC_BYTES} bytes, got type ${type} of ${payload.length} bytes`);
      }
      const serverRole = roleFromCode(payload[0]!);
      if (serverRole === undefined) return refuse(this.peer, `unknown role code ${payload[0]} in CHALLENGE`);
      const nonceS = payload.subarray(1, 1 + NONCE_BYTES);
      const macS = payload.subarray(1 + NONCE_BYTES);
      const expected = mac(this.psk, "sgm-auth-server", this.nonce, nonceS, this.role, serverRole);
      if (!timingSafeEqual(macS, expected)) return keysDiffer(this.peer);
      if (this.expectRole !== undefined && serverRole !== this.expectRole) {
        return refuse(this.peer, `the peer is a ${serverRole}, expected a ${this.expectRole}`, `a ${this.role} expected a ${this.expectRole}, not a ${serverRole}`);
      }
      this.serverRole = serverRole;
      const proof = mac(this.psk, "sgm-auth-client", nonceS, this.nonce, this.role, serverRole);
      return { state: "continue", send: [{ type: FRAME_PROOF, payload: proof }] };
    }
    if (type !== FRAME_WELCOME || payload.length !== 0) {
      return refuse(this.peer, `expected an empty WELCOME frame, got type ${type} of ${payload.length} bytes`);
    }
    return { state: "done", send: [], peerRole: this.serverRole };
  }
}

export class ServerHandshake {
  private readonly nonce = randomBytes(NONCE_BYTES);
  private clientRole: Role | undefined;
  private clientNonce: Uint8Array | undefined;

  constructor(
    private readonly psk: Uint8Array,
    private readonly role: Role,
    private readonly acceptRoles: readonly Role[],
    private readonly peer: string,
  ) {}

  receive(type: number, payload: Uint8Array): HandshakeStep {
    if (type === FRAME_AUTH_FAILED) return rejected(this.peer, payload);
    if (this.clientRole === undefined || this.clientNonce === undefined) {
      if (type !== FRAME_HELLO || payload.length !== 1 + NONCE_BYTES) {
        return refuse(this.peer, `expected a HELLO frame of ${1 + NONCE_BYTES} bytes, got type ${type} of ${payload.length} bytes`);
      }
      const clientRole = roleFromCode(payload[0]!);
      if (clientRole === undefined) return refuse(this.peer, `unknown role code ${payload[0]} in HELLO`);
      if (!this.acceptRoles.includes(clientRole)) {
        const accepted = this.acceptRoles.length > 0 ? this.acceptRoles.join(", ") : "none";
        return refuse(this.peer, `a ${this.role} does not accept a ${clientRole} (accepts: ${accepted})`);
      }
      this.clientRole = clientRole;
      this.clientNonce = payload.slice(1);
      const macS = mac(this.psk, "sgm-auth-server", this.clientNonce, this.nonce, clientRole, this.role);
      const challenge = concat([Uint8Array.of(ROLE_CODES[this.role]), this.nonce, macS]);
      return { state: "continue", send: [{ type: FRAME_CHALLENGE, payload: challenge }] };
    }
    if (type !== FRAME_PROOF || payload.length !== MAC_BYTES) {
      return refuse(this.peer, `expected a PROOF frame of ${MAC_BYTES} bytes, got type ${type} of ${payload.length} bytes`);
    }
    const expected = mac(this.psk, "sgm-auth-client", this.nonce, this.clientNonce, this.clientRole, this.role);
    if (!timingSafeEqual(payload, expected)) return keysDiffer(this.peer);
    return { state: "done", send: [{ type: FRAME_WELCOME, payload: new Uint8Array(0) }], peerRole: this.clientRole };
  }
}

function mac(psk: Uint8Array, label: string, first: Uint8Array, second: Uint8Array, clientRole: Role, serverRole: Role): Uint8Array {
  return createHmac("sha256", psk)
    .update(label)
    .update(first)
    .update(second)
    .update(Uint8Array.of(ROLE_CODES[clientRole], ROLE_CODES[serverRole]))
    .digest();
}

/** We found the peer wanting: tell it why, then give up. */
function refuse(peer: string, reason: string, toPeer = reason): HandshakeStep {
  return refusal(new SgmError("unavailable", `${peer}: authentication failed: ${reason}`), toPeer);
}

function keysDiffer(peer: string): HandshakeStep {
  return refusal(new SgmError("unavailable", `${peer}: authentication failed (pre-shared keys differ?)`), "pre-shared keys differ");
}

function refusal(error: SgmError, toPeer: string): HandshakeStep {
  const payload = new TextEncoder().encode(toPeer).subarray(0, HANDSHAKE_MAX_PAYLOAD);
  return { state: "failed", send: [{ type: FRAME_AUTH_FAILED, payload }], error };
}

/** The peer gave up on us; nothing is left to tell it. */
function rejected(peer: string, payload: Uint8Array): HandshakeStep {
  return { state: "failed", send: [], error: new SgmError("unavailable", `${peer}: authentication failed, the peer says: ${reasonText(payload)}`) };
}

/** The peer's reason, made safe for a one-line message. */
function reasonText(payload: Uint8Array): string {
  const text = new TextDecoder("utf-8", { fatal: false }).decode(payload).replace(/[\u0000-\u001f\u007f]+/g, " ").trim();
  return text === "" ? "(no reason given)" : text;
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}
