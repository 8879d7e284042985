// QMP's framing, for every reader of it (the client, the monitor holder):
// a socket to a QMP address, the name of its failure, and newline-delimited
// JSON objects read off it.

import net from "node:net";
import type { QmpAddress } from "./client.ts";

/** QEMU's replies to what sgm asks are a few KiB; a peer sending more (characters) without a newline is not QEMU, and is not buffered for ever. */
export const MAX_QMP_LINE = 4 << 20;

export function openQmpSocket(address: QmpAddress): net.Socket {
  return address.kind === "unix" ? net.connect({ path: address.path }) : net.connect({ host: address.host, port: address.port });
}

export function socketErrorText(err: NodeJS.ErrnoException): string {
  return err.code === "ENOENT" ? "no such socket" : err.code === "ECONNREFUSED" ? "connection refused" : err.message;
}

/** Splits what a peer sends into lines, each a JSON object; anything else is `noise`. */
export class QmpLineReader {
  private buffered = "";

  constructor(
    private readonly onObject: (message: Record<string, unknown>) => void,
    private readonly onNoise: (why: string) => void,
  ) {}

  /** Reads on; false once a line grew past MAX_QMP_LINE (what it held is dropped): the peer is not QEMU. */
  feed(text: string): boolean {
    this.buffered += text;
    let nl: number;
    while ((nl = this.buffered.indexOf("\n")) >= 0) {
      const line = this.buffered.slice(0, nl).trim();
      this.buffered = this.buffered.slice(nl + 1);
      if (line) this.parse(line);
    }
    if (this.buffered.length <= MAX_QMP_LINE) return true;
    this.buffered = "";
    return false;
  }

  private parse(line: string): void {
    let message: unknown;
    try {
      message = JSON.parse(line);
    } catch {
      return this.onNoise("not JSON");
    }
    // valid JSON that is no QMP message (null, a number, a list) is noise too
    if (typeof message === "object" && message !== null && !Array.isArray(message)) this.onObject(message as Record<string, unknown>);
    else this.onNoise("not a JSON object");
  }
}
