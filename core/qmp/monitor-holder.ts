// The monitor holder: a small process that holds a destination QEMU's QMP
// connection, with out-of-band commands enabled, for as long as a postcopy
// migration into it may need recovering, and lets one client at a time
// (the gather) use that connection through a socket of its own.
//
// Why: in postcopy, a QEMU thread holding the big lock may touch a page not
// yet delivered and wait for it with the lock held (TCG delivers every
// interrupt so: cpu_handle_interrupt, accel/tcg/cpu-exec.c; KVM's device
// models read guest memory so). Should the gather die then, the page never
// comes, and QEMU's main loop stays blocked: every monitor ignores in-band
// commands, `qmp_capabilities` included, so a new connection can never
// enable out-of-band commands (exec-oob needs them negotiated:
// qapi/qmp-dispatch.c). Only `migrate-recover` sent out of band on a
// connection negotiated before can bring the page (QEMU made it allow-oob
// for this). A holder outlives the gather, so that connection does.
//
// To its client the holder looks like QEMU: QEMU's greeting, marked with
// "sgm-holder"; it answers `qmp_capabilities` itself, and `sgm-holder-facts`
// with what it knows without QEMU's main loop (the last migration status
// of the MIGRATION events, the machine type); it passes everything else on,
// renumbering ids so that a dead client's late answers reach no one.

import { existsSync, rmSync } from "node:fs";
import net from "node:net";
import { SgmError } from "../errors.ts";
import { type QmpAddress, describeQmpAddress } from "./client.ts";
import { MAX_QMP_LINE, openQmpSocket, QmpLineReader, socketErrorText } from "./qmp-lines.ts";

/** A holder's own command, answered without QEMU. */
export const HOLDER_FACTS = "sgm-holder-facts";
/** How a holder turns away a second client, in its refusal; the launcher asks again on it. */
export const HOLDER_BUSY = "serves one client at a time";

export interface HolderFacts {
  migration: string;
  machine: string;
}

/** Once postcopy began, the holder stays until one of these (or its QEMU) ends the migration. */
const ENDED = new Set(["completed", "failed", "cancelled"]);
/** A holder nobody connects to after starting has lost its gather before it began. */
const FIRST_CLIENT_MS = 60_000;
/** A client gone before postcopy: its MIGRATION events may still be on their way (a switch it saw). */
const GRACE_MS = 5_000;
/** A holder whose socket is gone can be reached by no one: it lets go of the monitor, or in postcopy listens again (checked this often). */
const SOCKET_CHECK_MS = 5_000;

type Json = Record<string, unknown>;

class LineSocket {
  constructor(
    readonly socket: net.Socket,
    onLine: (message: Json) => void,
    onBad: (why: string) => void,
  ) {
    const lines = new QmpLineReader(onLine, onBad);
    socket.setEncoding("utf8");
    socket.on("data", (text: string) => {
      if (lines.feed(text)) return;
      onBad(`a line longer than ${MAX_QMP_LINE} characters`);
      socket.destroy();
    });
    socket.on("error", () => {});
  }

  send(message: Json): void {
    if (!this.socket.destroyed) this.socket.write(JSON.stringify(message) + "\n");
  }
}

/** An in-band command on its way to QEMU: the holder's own (owner null) or a client's. */
interface InBand {
  id: number;
  message: Json;
  owner: LineSocket | null;
}

/**
 * Runs a holder until it has nothing left to hold; resolves with its exit
 * code. `ready` gets one line, "ready" or what went wrong, once.
 */
export function holdMonitor(address: QmpAddress, socketPath: string, ready: (line: string) => void): Promise<number> {
  return new MonitorHolder(address, socketPath, ready).run();
}

class MonitorHolder {
  private readonly where: string;
  private readonly qemu: LineSocket;
  private readonly qemuClosed: Promise<void>;
  private readonly greeting = Promise.withResolvers<Json>();
  private readonly finished = Promise.withResolvers<number>();
  private readonly answers = new Map<number, (message: Json) => void>();
  /**
   * QEMU takes one in-band command at a time from here: with out-of-band
   * enabled it would queue eight and then read nothing more, not even the
   * exec-oob that a blocked main loop needs (monitor/qmp.c).
   */
  private readonly inBand: InBand[] = [];
  private inFlight: number | null = null;
  private nextId = 1;
  private readied = false;
  private held = false;
  private facts: HolderFacts = { migration: "none", machine: "" };
  private postcopySeen = false;
  private server: net.Server | null = null;
  private client: LineSocket | null = null;

  constructor(
    address: QmpAddress,
    private readonly socketPath: string,
    private readonly ready: (line: string) => void,
  ) {
    this.where = describeQmpAddress(address);
    const socket = openQmpSocket(address);
    let failure = "closed before its greeting";
    socket.on("error", (err: NodeJS.ErrnoException) => (failure = socketErrorText(err)));
    this.qemuClosed = new Promise((resolve) =>
      socket.on("close", () => {
        this.say(`QMP ${this.where}: ${failure}`);
        resolve();
      }),
    );
    this.qemu = new LineSocket(socket, (message) => this.fromQemu(message), () => {});
  }

  async run(): Promise<number> {
    void this.setup();
    const code = await Promise.race([this.finished.promise, this.qemuClosed.then(() => (this.held ? 0 : 69))]);
    if (this.server !== null) {
      this.server.close();
      rmSync(this.socketPath, { force: true });
    }
    this.client?.socket.destroy();
    this.qemu.socket.destroy();
    return code;
  }

  private say(line: string): void {
    if (this.readied) return;
    this.readied = true;
    this.held = line === "ready";
    this.ready(line);
  }

  private async setup(): Promise<void> {
    try {
      const greeting = await withTimeout(this.greeting.promise, 10_000, `QMP ${this.where}: no greeting within 10000 ms`);
      const offered = ((greeting.QMP as Json | undefined)?.capabilities as unknown[] | undefined) ?? [];
      if (!offered.includes("oob")) throw new SgmError("unavailable", `QMP ${this.where} offers no out-of-band commands`);
      await this.ask({ execute: "qmp_capabilities", arguments: { enable: ["oob"] } });
      const machine = String((await this.ask({ execute: "qom-get", arguments: { path: "/machine", property: "type" } })).return);
      const migration = (await this.ask({ execute: "query-migrate" })).return as Json;
      this.facts = { machine: machine.replace(/-machine$/, ""), migration: "none" };
      this.migrationIs(typeof migration.status === "string" ? migration.status : "none");
      rmSync(this.socketPath, { force: true }); // a holder that was here is gone: its client found no one (holder-launch.ts)
      this.server = await listen(this.socketPath, (socket) => this.serve(socket, greeting));
      this.say("ready");
      setTimeout(() => this.endIfIdle(), FIRST_CLIENT_MS).unref();
      setInterval(() => void this.checkSocket(greeting), SOCKET_CHECK_MS).unref();
    } catch (err) {
      this.say(err instanceof Error ? err.message : String(err));
      this.finished.resolve(69);
    }
  }

  private async checkSocket(greeting: Json): Promise<void> {
    if (this.client !== null || existsSync(this.socketPath) || this.server === null) return;
    if (!this.postcopySeen || ENDED.has(this.facts.migration)) return this.finished.resolve(0);
    // the one monitor with out-of-band commands: a --resume may yet need it
    this.server.close();
    this.server = null;
    try {
      this.server = await listen(this.socketPath, (socket) => this.serve(socket, greeting));
    } catch {
      // nowhere to listen: kept all the same, for QEMU's sake, until the migration ends
    }
  }

  /** The holder's own in-band question, before any client. */
  private ask(message: Json, timeoutMs = 10_000): Promise<Json> {
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      const timer = setTimeout(() => reject(new SgmError("unavailable", `QMP ${this.where}: no answer to '${String(message.execute)}' within ${timeoutMs} ms`)), timeoutMs);
      this.answers.set(id, (m) => {
        clearTimeout(timer);
        if ("error" in m) reject(new SgmError("unavailable", `QMP ${this.where}: ${JSON.stringify(m.error)}`));
        else resolve(m);
      });
      this.sendInBand({ id, message, owner: null });
    });
  }

  private sendInBand(command: InBand): void {
    this.inBand.push(command);
    this.pump();
  }

  private pump(): void {
    if (this.inFlight !== null) return;
    const next = this.inBand.shift();
    if (!next) return;
    this.inFlight = next.id;
    this.qemu.send({ ...next.message, id: next.id });
  }

  private fromQemu(message: Json): void {
    if ("QMP" in message) return this.greeting.resolve(message);
    if (typeof message.event === "string") {
      const status = message.event === "MIGRATION" ? (message.data as Json | undefined)?.status : undefined;
      if (typeof status === "string") this.migrationIs(status);
      this.client?.send(message);
      if (typeof status === "string" && ENDED.has(status)) this.endIfIdle();
      return;
    }
    if (typeof message.id !== "number") {
      // QEMU's answer to a line it could not read: the one in flight, as it takes one at a time
      if ("id" in message || !("error" in message)) return;
      if (this.inFlight === null) return this.client?.send(message);
      message = { ...message, id: this.inFlight };
    }
    const id = message.id as number;
    if (id === this.inFlight) {
      this.inFlight = null;
      this.pump();
    }
    const answer = this.answers.get(id);
    this.answers.delete(id);
    answer?.(message);
  }

  private migrationIs(status: string): void {
    // 7.2's migrate-recover announces 'setup' though its postcopy stays paused (qemu_start_incoming_migration)
    if (this.postcopySeen && status === "setup") return;
    if (status.startsWith("postcopy")) this.postcopySeen = true;
    this.facts.migration = status;
  }

  /** No client, and nothing a --resume could need: the holder lets go of the monitor. */
  private endIfIdle(): void {
    if (this.client !== null) return;
    if (this.postcopySeen && !ENDED.has(this.facts.migration)) return;
    this.finished.resolve(0);
  }

  private serve(socket: net.Socket, greeting: Json): void {
    if (this.client !== null) {
      socket.on("error", () => {});
      socket.end(JSON.stringify({ error: { class: "GenericError", desc: `sgm's monitor holder for ${this.where} ${HOLDER_BUSY}` } }) + "\n");
      return;
    }
    const c: LineSocket = new LineSocket(
      socket,
      (message) => this.fromClient(c, message),
      (why) => c.send({ error: { class: "GenericError", desc: `sgm's monitor holder: ${why}` } }),
    );
    this.client = c;
    socket.on("close", () => {
      if (this.client !== c) return;
      this.client = null;
      // what it asked and QEMU has yet to see goes; what QEMU has, it answers to no one
      for (let k = this.inBand.length - 1; k >= 0; k--) if (this.inBand[k]!.owner === c) this.answers.delete(this.inBand.splice(k, 1)[0]!.id);
      if (this.postcopySeen) this.endIfIdle();
      else setTimeout(() => this.endIfIdle(), GRACE_MS).unref();
    });
    c.send({ ...greeting, "sgm-holder": {} });
  }

  private fromClient(c: LineSocket, message: Json): void {
    const theirs = message.id;
    const local = message.execute === "qmp_capabilities" ? {} : message.execute === HOLDER_FACTS ? { ...this.facts } : null;
    if (local !== null) return c.send({ return: local, ...(theirs !== undefined ? { id: theirs } : {}) });
    const id = this.nextId++;
    this.answers.set(id, (answer) => {
      const { id: _ours, ...rest } = answer;
      if (this.client === c) c.send(theirs === undefined ? rest : { ...rest, id: theirs });
    });
    if ("exec-oob" in message) this.qemu.send({ ...message, id });
    else this.sendInBand({ id, message, owner: c });
  }
}

function listen(path: string, serve: (socket: net.Socket) => void): Promise<net.Server> {
  return new Promise((resolve, reject) => {
    const server = net.createServer(serve);
    server.on("error", (err) => reject(new SgmError("unavailable", `cannot listen on ${path}: ${err.message}`)));
    server.listen(path, () => resolve(server));
  });
}

function withTimeout<T>(promise: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout>;
  return Promise.race([promise, new Promise<T>((_, reject) => (timer = setTimeout(() => reject(new SgmError("unavailable", message)), ms)))]).finally(() =>
    clearTimeout(timer),
  );
}
