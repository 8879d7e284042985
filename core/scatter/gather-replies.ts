// One VM's control messages with the gather: what scatter sends, and the
// replies it waits for, each kept by type until taken (a reply may come
// before it is waited for).

import { SgmError } from "../errors.ts";
import type { PeerConnection } from "../wire/connection.ts";
import { type Control, encodeControl } from "../wire/control.ts";
import { FrameType } from "../wire/messages.ts";

export class GatherReplies {
  private readonly conn: PeerConnection;
  private readonly vmName: string;
  private readonly replies = new Map<Control["t"], PromiseWithResolvers<Control>>();

  constructor(conn: PeerConnection, vmName: string) {
    this.conn = conn;
    this.vmName = vmName;
  }

  send(message: Control): void {
    try {
      this.conn.send(FrameType.CONTROL, encodeControl(message));
    } catch {
      // a closed connection surfaces through the eviction's onDisconnect
    }
  }

  /** A reply came. */
  resolve(message: Control): void {
    this.entry(message.t).resolve(message);
  }

  wait(type: Control["t"]): Promise<Control> {
    return this.entry(type).promise;
  }

  /** Drops a reply of this type, come or not: the next wait is for a new one. */
  forget(type: Control["t"]): void {
    this.replies.delete(type);
  }

  /** `promise`, or an error naming `what` after `ms`. */
  async withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new SgmError("unavailable", `VM ${this.vmName}: ${what}`)), ms);
    });
    try {
      return await Promise.race([promise, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  private entry(type: Control["t"]): PromiseWithResolvers<Control> {
    let r = this.replies.get(type);
    if (!r) {
      r = Promise.withResolvers<Control>();
      this.replies.set(type, r);
    }
    return r;
  }
}
