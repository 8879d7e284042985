// What scatter asks a relay before it places any page there: how much room
// it has for this run, and to hold some of that room while the run lasts.

import { SgmError } from "../errors.ts";
import type { PeerConnection } from "../wire/connection.ts";
import { type Control, decodeControl, encodeControl, FrameType } from "../wire/messages.ts";

/** How long a relay has to answer before it is left out. */
const ANSWER_TIMEOUT_MS = 5000;

export type RelayFigures = Extract<Control, { t: "relay-stats" }>;

/** The relay's figures, with `free` the room this run may fill. */
export function askRelayFigures(conn: PeerConnection, address: string, run: string): Promise<RelayFigures> {
  return ask(conn, address, { t: "relay-stats?", run }, "relay-stats");
}

/** Reserves `bytes` of the relay's room for the run; resolves with what the relay granted. */
export async function reserveRoom(conn: PeerConnection, address: string, run: string, bytes: number): Promise<number> {
  const reply = await ask(conn, address, { t: "relay-reserve", run, bytes: Math.round(bytes) }, "relay-reserved");
  return reply.bytes;
}

function ask<T extends Control["t"]>(conn: PeerConnection, address: string, question: Control, answer: T): Promise<Extract<Control, { t: T }>> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new SgmError("unavailable", `relay ${address} did not answer '${question.t}' within ${ANSWER_TIMEOUT_MS / 1000} s`)), ANSWER_TIMEOUT_MS);
    conn.onFrame((type, payload) => {
      const message = type === FrameType.CONTROL ? decodeControl(payload) : null;
      if (message?.t !== answer) throw new SgmError("data", `relay ${address} answered '${question.t}' with ${message ? `'${message.t}'` : `frame type ${type}`}`);
      clearTimeout(timer);
      resolve(message as Extract<Control, { t: T }>);
    });
    void conn.closed.then((reason) => {
      clearTimeout(timer);
      reject(new SgmError("unavailable", `relay ${address}: ${reason?.message ?? "connection closed"}`));
    });
    conn.send(FrameType.CONTROL, encodeControl(question));
  });
}
