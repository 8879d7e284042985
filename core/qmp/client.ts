// QMP client: one connection to one QEMU monitor, over a unix or tcp socket.
// QMP is newline-delimited JSON: a greeting, then commands answered in order
// (each tagged with our id) interleaved with asynchronous events.

import net from "node:net";
import { SgmError } from "../errors.ts";
import { formatHostPort } from "../net/host-port.ts";
import { MAX_QMP_LINE, openQmpSocket, QmpLineReader, socketErrorText } from "./qmp-lines.ts";

export type QmpAddress = { kind: "unix"; path: string } | { kind: "tcp"; host: string; port: number };

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export type QmpEventListener = (event: QmpEvent) => void;

export interface QmpVersion {
  major: number;
  minor: number;
  micro: number;
  package: string;
}

/** QEMU answered a command with an error. */
export class QmpCommandError extends SgmError {
  readonly command: string;
  readonly errorClass: string;
  readonly desc: string;

  constructor(command: string, errorClass: string, desc: string) {
    super("unavailable", `QEMU refused '${command}': ${desc}`);
    this.command = command;
    this.errorClass = errorClass;
    this.desc = desc;
  }
}

/** Parses "unix:/path", "/path", "tcp:host:port" or "host:port". */
export function parseQmpAddress(text: string): QmpAddress {
  const tcp = /^(?:tcp:)?(\[[^\]]+\]|[^:/]+):(\d{1,5})$/.exec(text);
  if (tcp && !text.startsWith("unix:")) {
    const port = Number(tcp[2]);
    if (port < 1 || port > 65535) throw new SgmError("usage", `QMP address '${text}': port out of range`);
    return { kind: "tcp", host: tcp[1]!.replace(/^\[|\]$/g, ""), port };
  }
  const path = text.startsWith("unix:") ? text.slice(5) : text;
  if (path === "") throw new SgmError("usage", `QMP address '${text}' is empty`);
  return { kind: "unix", path };
}

/** The form parseQmpAddress reads back. */
export function qmpAddressText(address: QmpAddress): string {
  return address.kind === "unix" ? `unix:${address.path}` : `tcp:${formatHostPort(address.host, address.port)}`;
}

export function describeQmpAddress(address: QmpAddress): string {
  return address.kind === "unix" ? address.path : `${address.host}:${address.port}`;
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: ReturnType<typeof setTimeout>;
}

export interface QmpConnectOptions {
  /** Bound on connecting plus greeting plus capability negotiation. */
  timeoutMs?: number;
}

export interface QmpCommandOptions {
  timeoutMs?: number;
  /** Run out of band (exec-oob), past a main loop that may be blocked: only through a monitor holder (monitor-holder.ts). */
  outOfBand?: boolean;
}

const DEFAULT_COMMAND_TIMEOUT_MS = 30_000;
/** How a connection that ended before QEMU (or a holder) greeted fails: a holder does so while it ends. */
export const CLOSED_BEFORE_GREETING = "closed before the greeting";
export { MAX_QMP_LINE };

export class QmpClient {
  readonly address: QmpAddress;
  readonly version: QmpVersion;
  /** Whether this is a monitor holder's connection, out-of-band commands enabled, rather than QEMU's own. */
  readonly held: boolean;
  /** Resolves when the connection is gone, for whatever reason. */
  readonly closed: Promise<void>;

  private readonly socket: net.Socket;
  private readonly pending = new Map<number, Pending>();
  private readonly listeners = new Set<QmpEventListener>();
  private readonly closeListeners = new Set<() => void>();
  private nextId = 1;
  // QEMU never sends partial JSON lines: noise is ignored rather than kill the session
  private readonly lines = new QmpLineReader((message) => this.onMessage(message), () => {});
  private isClosed = false;
  /** Why sgm closed the connection itself, when it did. */
  private closeReason: string | null = null;
  private resolveClosed!: () => void;

  private constructor(address: QmpAddress, socket: net.Socket, version: QmpVersion, held: boolean, rest: string) {
    this.address = address;
    this.socket = socket;
    this.version = version;
    this.held = held;
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    socket.on("data", (chunk: Buffer) => this.onData(chunk.toString("utf8")));
    socket.on("close", () => this.onClose());
    socket.on("error", () => {}); // surfaced through "close" and pending rejections
    if (rest) this.onData(rest);
  }

  static async connect(address: QmpAddress, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const where = describeQmpAddress(address);
    const timeoutMs = options.timeoutMs ?? 10_000;
    const { socket, greeting, rest } = await new Promise<{ socket: net.Socket; greeting: string; rest: string }>(
      (resolve, reject) => {
        const socket = openQmpSocket(address);
        let text = "";
        const fail = (message: string, cause?: Error) => {
          clearTimeout(timer);
          socket.destroy();
          reject(new SgmError("unavailable", `QMP ${where}: ${message}`, { cause }));
        };
        const timer = setTimeout(() => fail(`no greeting within ${timeoutMs} ms`), timeoutMs);
        socket.on("error", (err: NodeJS.ErrnoException) => fail(socketErrorText(err), err));
        socket.on("close", () => fail(CLOSED_BEFORE_GREETING));
        socket.on("data", (chunk: Buffer) => {
          text += chunk.toString("utf8");
          const nl = text.indexOf("\n");
          if (nl < 0) {
            if (text.length > MAX_QMP_LINE) fail(`a greeting longer than ${MAX_QMP_LINE} characters: not QEMU`);
            return;
          }
          clearTimeout(timer);
          socket.removeAllListeners();
          resolve({ socket, greeting: text.slice(0, nl), rest: text.slice(nl + 1) });
        });
      },
    );
    let version: QmpVersion;
    let held = false;
    let refusal: unknown;
    try {
      type Greeting = { QMP?: { version?: { qemu?: QmpVersion; package?: string } }; "sgm-holder"?: unknown; error?: { desc?: unknown } };
      const parsed = JSON.parse(greeting) as Greeting | null;
      held = parsed?.["sgm-holder"] !== undefined;
      // a monitor holder busy with another client says so instead of greeting
      refusal = parsed?.error?.desc;
      const qemu = parsed?.QMP?.version?.qemu;
      if (!qemu || ![qemu.major, qemu.minor, qemu.micro].every((n) => Number.isInteger(n))) throw new Error("no QMP greeting");
      const pkg = parsed?.QMP?.version?.package;
      version = { major: qemu.major, minor: qemu.minor, micro: qemu.micro, package: typeof pkg === "string" ? pkg : "" };
    } catch {
      socket.destroy();
      if (typeof refusal === "string") throw new SgmError("unavailable", `QMP ${where}: ${refusal.slice(0, 200)}`);
      throw new SgmError("unavailable", `QMP ${where}: not a QMP greeting: ${greeting.slice(0, 80)}`);
    }
    const client = new QmpClient(address, socket, version, held, rest);
    await client.execute("qmp_capabilities", undefined, { timeoutMs });
    return client;
  }

  /** Runs a command; resolves with its "return" value. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, options: QmpCommandOptions = {}): Promise<T> {
    if (this.isClosed) {
      return Promise.reject(new SgmError("unavailable", `QMP ${describeQmpAddress(this.address)}: closed; cannot run '${command}'`));
    }
    if (options.outOfBand && !this.held) return Promise.reject(new SgmError("internal", `QMP '${command}' out of band on a connection without it`));
    const id = this.nextId++;
    const timeoutMs = options.timeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new SgmError("unavailable", `QMP '${command}' got no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      const key = options.outOfBand ? "exec-oob" : "execute";
      const message = args === undefined ? { [key]: command, id } : { [key]: command, arguments: args, id };
      this.socket.write(JSON.stringify(message) + "\n");
    });
  }

  /** Adds an event listener; returns a function that removes it. */
  onEvent(listener: QmpEventListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Resolves with the first event named `name` that satisfies `match`. */
  waitForEvent(name: string, match: (event: QmpEvent) => boolean = () => true, timeoutMs = 60_000): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const finish = () => {
        clearTimeout(timer);
        offEvent();
        this.closeListeners.delete(onClosed);
      };
      const offEvent = this.onEvent((event) => {
        if (event.event !== name || !match(event)) return;
        finish();
        resolve(event);
      });
      const onClosed = () => {
        finish();
        reject(new SgmError("unavailable", `QMP ${describeQmpAddress(this.address)}: closed while waiting for ${name}`));
      };
      const timer = setTimeout(() => {
        finish();
        reject(new SgmError("unavailable", `QMP ${describeQmpAddress(this.address)}: no ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      if (this.isClosed) onClosed();
      else this.closeListeners.add(onClosed);
    });
  }

  close(): void {
    this.socket.destroy();
  }

  get isOpen(): boolean {
    return !this.isClosed;
  }

  private onData(text: string): void {
    if (this.lines.feed(text)) return;
    this.closeReason = `QMP ${describeQmpAddress(this.address)} sent a line longer than ${MAX_QMP_LINE} characters: not QEMU`;
    this.socket.destroy();
  }

  private onMessage(message: Record<string, unknown>): void {
    if (typeof message.event === "string") {
      const event: QmpEvent = {
        event: message.event,
        data: isObject(message.data) ? message.data : {},
        timestamp: isObject(message.timestamp) ? (message.timestamp as QmpEvent["timestamp"]) : { seconds: 0, microseconds: 0 },
      };
      for (const listener of [...this.listeners]) listener(event);
      return;
    }
    const id = message.id;
    if (typeof id !== "number") return;
    const pending = this.pending.get(id);
    if (!pending) return;
    this.pending.delete(id);
    clearTimeout(pending.timer);
    if ("error" in message) {
      const error = isObject(message.error) ? message.error : {};
      const errorClass = typeof error.class === "string" ? error.class : "GenericError";
      pending.reject(new QmpCommandError(pending.command, errorClass, typeof error.desc === "string" ? error.desc : "unknown error"));
    } else {
      pending.resolve(message.return);
    }
  }

  private onClose(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    for (const pending of this.pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(new SgmError("unavailable", this.closeReason ?? `QEMU closed the QMP connection while '${pending.command}' was pending`));
    }
    this.pending.clear();
    for (const listener of [...this.closeListeners]) listener();
    this.resolveClosed();
  }
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
