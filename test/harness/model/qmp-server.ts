// The QMP side of a model QEMU: a unix socket that greets, negotiates
// capabilities, answers commands from a table, and sends events, the way
// QEMU's monitor does, so sgm's roles drive a model exactly as they drive
// QEMU.

import type { Socket, UnixSocketListener } from "bun";

export type QmpReply = unknown;
export type QmpHandler = (args: Record<string, unknown>) => QmpReply | Promise<QmpReply>;

/** Thrown by a handler: QMP answers the command with this error. */
export class QmpError extends Error {}

export class QmpServer {
  private readonly listener: UnixSocketListener<{ buffered: string }>;
  private readonly clients = new Set<Socket<{ buffered: string }>>();

  constructor(path: string, version: { major: number; minor: number; micro: number }, handlers: Record<string, QmpHandler>) {
    const greeting = `${JSON.stringify({ QMP: { version: { qemu: version, package: "model" }, capabilities: [] } })}\n`;
    const all: Record<string, QmpHandler> = { qmp_capabilities: () => ({}), ...handlers };
    this.listener = Bun.listen<{ buffered: string }>({
      unix: path,
      socket: {
        open: (socket) => {
          socket.data = { buffered: "" };
          this.clients.add(socket);
          socket.write(greeting);
        },
        data: (socket, chunk) => {
          socket.data.buffered += chunk.toString();
          let nl: number;
          while ((nl = socket.data.buffered.indexOf("\n")) >= 0) {
            const line = socket.data.buffered.slice(0, nl);
            socket.data.buffered = socket.data.buffered.slice(nl + 1);
            if (line.trim()) void this.answer(socket, line, all);
          }
        },
        close: (socket) => {
          this.clients.delete(socket);
        },
      },
    });
  }

  /** Sends an event to every client, as QEMU does. */
  event(name: string, data: Record<string, unknown> = {}): void {
    const now = Date.now();
    const line = `${JSON.stringify({ event: name, data, timestamp: { seconds: Math.floor(now / 1000), microseconds: (now % 1000) * 1000 } })}\n`;
    for (const client of this.clients) client.write(line);
  }

  close(): void {
    for (const client of this.clients) client.end();
    this.listener.stop(true);
  }

  private async answer(socket: Socket<{ buffered: string }>, line: string, handlers: Record<string, QmpHandler>): Promise<void> {
    const message = JSON.parse(line) as { execute: string; arguments?: Record<string, unknown>; id?: unknown };
    const handler = handlers[message.execute];
    let reply: Record<string, unknown>;
    if (!handler) {
      reply = { error: { class: "CommandNotFound", desc: `The command ${message.execute} has not been found` } };
    } else {
      try {
        reply = { return: (await handler(message.arguments ?? {})) ?? {} };
      } catch (err) {
        if (!(err instanceof QmpError)) throw err;
        reply = { error: { class: "GenericError", desc: err.message } };
      }
    }
    socket.write(`${JSON.stringify({ ...reply, id: message.id })}\n`);
  }
}
