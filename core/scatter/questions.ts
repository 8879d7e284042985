// What scatter asks its peers before any page moves: a relay how much room
// it has for this run, and to hold some of it while the run lasts; the
// gather (for `sgm check`) whether it would take a VM.

import { SgmError } from "../errors.ts";
import type { PeerConnection } from "../wire/connection.ts";
import { type Control, decodeControl, encodeControl } from "../wire/control.ts";
import { FrameType } from "../wire/messages.ts";
import { exchange } from "./exchange.ts";

/** How long a peer has to answer before it is dropped. */
const ANSWER_TIMEOUT_MS = 5000;

export type RelayFigures = Extract<Control, { t: "relay-stats" }>;

/** The relay's figures, with `free` the room this run may fill. */
export function askRelayFigures(conn: PeerConnection, address: string, run: string, signal?: AbortSignal): Promise<RelayFigures> {
  return ask(conn, `relay ${address}`, { t: "relay-stats?", run }, "relay-stats", signal);
}

/** Reserves `bytes` of the relay's room for the run; resolves with what the relay granted. */
export async function reserveRoom(conn: PeerConnection, address: string, run: string, bytes: number, signal?: AbortSignal): Promise<number> {
  const reply = await ask(conn, `relay ${address}`, { t: "relay-reserve", run, bytes: Math.round(bytes) }, "relay-reserved", signal);
  return reply.bytes;
}

/** Has the relay drop what it keeps for the evacuation `keeper`; resolves with how many pages that was. */
export async function dropKept(conn: PeerConnection, address: string, keeper: string): Promise<number> {
  const reply = await ask(conn, `relay ${address}`, { t: "relay-unkeep", run: keeper }, "relay-unkept");
  return reply.pages;
}

/** Gives back the run's reservation, without waiting for the answer (whoever reads the connection next skips it). */
export function releaseRoom(conn: PeerConnection, run: string): void {
  if (conn.isOpen) conn.send(FrameType.CONTROL, encodeControl({ t: "relay-reserve", run, bytes: 0 }));
}

/** Sends `question` and resolves with the peer's `answer`; the connection's frame handler is this exchange's until then. */
export function ask<T extends Control["t"]>(conn: PeerConnection, who: string, question: Control, answer: T, signal?: AbortSignal): Promise<Extract<Control, { t: T }>> {
  const timedOut = () => new SgmError("unavailable", `${who} did not answer '${question.t}' within ${ANSWER_TIMEOUT_MS / 1000} s`);
  return exchange<Extract<Control, { t: T }>>(conn, { who, timeoutMs: ANSWER_TIMEOUT_MS, timedOut, signal }, (settle) => {
    conn.onFrame((type, payload) => {
      const message = type === FrameType.CONTROL ? decodeControl(payload) : null;
      if (message?.t !== answer) throw new SgmError("data", `${who} answered '${question.t}' with ${message ? `'${message.t}'` : `frame type ${type}`}`);
      settle.resolve(message as Extract<Control, { t: T }>);
    });
    conn.send(FrameType.CONTROL, encodeControl(question));
  });
}
