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

import { rmSync } from "node:fs";
import net from "node:net";
import { SgmError } from "../errors.ts";
import { type QmpAddress, describeQmpAddress, MAX_QMP_LINE } from "./client.ts";

/** A holder's own command, answered without QEMU. */
export const HOLDER_FACTS = "sgm-holder-facts";

export interface HolderFacts {
  migration: string;
  machine: string;
}

/** While the migration is in one of these, a gather may come back with --resume: the holder stays. */
const RESUMABLE = new Set(["postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-recover-setup"]);
/** A holder nobody connects to after starting has lost its gather before it began. */
const FIRST_CLIENT_MS = 60_000;

type Json = Record<string, unknown>;

class LineSocket {
  private buffered = "";

  constructor(
    readonly socket: net.Socket,
    onLine: (message: Json) => void,
    onBad: (why: string) => void,
  ) {
    socket.setEncoding("utf8");
    socket.on("data", (text: string) => {
      this.buffered += text;
      let nl: number;
      while ((nl = this.buffered.indexOf("\n")) >= 0) {
        const line = this.buffered.slice(0, nl).trim();
        this.buffered = this.buffered.slice(nl + 1);
        if (!line) continue;
        let message: unknown;
        try {
          message = JSON.parse(line);
        } catch {
          onBad("not JSON");
          continue;
        }
        if (typeof message === "object" && message !== null && !Array.isArray(message)) onLine(message as Json);
        else onBad("not a JSON object");
      }
      if (this.buffered.length > MAX_QMP_LINE) {
        this.buffered = "";
        onBad(`a line longer than ${MAX_QMP_LINE} characters`);
        socket.destroy();
      }
    });
    socket.on("error", () => {});
  }

  send(message: Json): void {
    if (!this.socket.destroyed) this.socket.write(JSON.stringify(message) + "\n");
  }
}

/**
 * Runs a holder until it has nothing left to hold; resolves with its exit
 * code. `ready` gets one line, "ready" or what went wrong, once.
 */
export async function holdMonitor(address: QmpAddress, socketPath: string, ready: (line: string) => void): Promise<number> {
  const where = describeQmpAddress(address);
  let readied = false;
  let held = false;
  const say = (line: string) => {
    if (readied) return;
    readied = true;
    held = line === "ready";
    ready(line);
  };
  let qemu: LineSocket;
  let greeting: Json;
  let facts: HolderFacts;
  const answers = new Map<number, (message: Json) => void>();
  let nextId = 1;
  let onClient: ((message: Json) => void) | null = null;
  let lastMigration = "none";
  let server: net.Server | null = null;
  let client: LineSocket | null = null;
  let hadClient = false;
  let finish!: (code: number) => void;
  const finished = new Promise<number>((r) => (finish = r));
  function checkDone(): void {
    if (client === null && hadClient && !RESUMABLE.has(lastMigration)) finish(0);
  }

  const qemuClosed = new Promise<void>((resolve) => {
    const socket = address.kind === "unix" ? net.connect({ path: address.path }) : net.connect({ host: address.host, port: address.port });
    let failure = "closed before its greeting";
    socket.on("error", (err: NodeJS.ErrnoException) => (failure = err.code === "ENOENT" ? "no such socket" : err.message));
    socket.on("close", () => {
      say(`QMP ${where}: ${failure}`);
      resolve();
    });
    let greeted: (g: Json) => void;
    const greetingSeen = new Promise<Json>((r) => (greeted = r));
    qemu = new LineSocket(
      socket,
      (message) => {
        if ("QMP" in message) return greeted(message);
        if (typeof message.event === "string") {
          const status = message.event === "MIGRATION" ? (message.data as Json | undefined)?.status : undefined;
          if (typeof status === "string") lastMigration = status;
          onClient?.(message);
          if (typeof status === "string") checkDone();
          return;
        }
        const answer = typeof message.id === "number" ? answers.get(message.id) : undefined;
        if (answer) {
          answers.delete(message.id as number);
          answer(message);
        } else if (!("id" in message)) onClient?.(message); // QEMU's answer to a line it could not read
      },
      () => {},
    );
    void setup(greetingSeen);
  });
  const ask = (command: Json, timeoutMs = 10_000): Promise<Json> =>
    new Promise((resolve, reject) => {
      const id = nextId++;
      const timer = setTimeout(() => {
        answers.delete(id);
        reject(new SgmError("unavailable", `QMP ${where}: no answer to '${String(command.execute ?? command["exec-oob"])}' within ${timeoutMs} ms`));
      }, timeoutMs);
      answers.set(id, (m) => {
        clearTimeout(timer);
        if ("error" in m) reject(new SgmError("unavailable", `QMP ${where}: ${JSON.stringify(m.error)}`));
        else resolve(m);
      });
      qemu.send({ ...command, id });
    });

  async function setup(greetingSeen: Promise<Json>): Promise<void> {
    try {
      greeting = await withTimeout(greetingSeen, 10_000, `QMP ${where}: no greeting within 10000 ms`);
      const offered = ((greeting.QMP as Json | undefined)?.capabilities as unknown[] | undefined) ?? [];
      if (!offered.includes("oob")) throw new SgmError("unavailable", `QMP ${where} offers no out-of-band commands`);
      await ask({ execute: "qmp_capabilities", arguments: { enable: ["oob"] } });
      const machine = String((await ask({ execute: "qom-get", arguments: { path: "/machine", property: "type" } })).return).replace(/-machine$/, "");
      const migration = (await ask({ execute: "query-migrate" })).return as Json;
      lastMigration = typeof migration.status === "string" ? migration.status : "none";
      facts = { migration: lastMigration, machine };
      rmSync(socketPath, { force: true }); // a holder that was here is gone: its client found no one (holder-launch.ts)
      server = await listen(socketPath, serve);
      say("ready");
      setTimeout(() => {
        if (!hadClient) finish(0);
      }, FIRST_CLIENT_MS).unref();
    } catch (err) {
      say(err instanceof Error ? err.message : String(err));
      finish(69);
    }
  }

  function serve(socket: net.Socket): void {
    if (client !== null) {
      socket.end(JSON.stringify({ error: { class: "GenericError", desc: `sgm's monitor holder for ${where} serves one client at a time` } }) + "\n");
      return;
    }
    hadClient = true;
    const mine = new Map<number, unknown>();
    const c = new LineSocket(
      socket,
      (message) => {
        const theirId = message.id;
        const local = message.execute === "qmp_capabilities" ? {} : message.execute === HOLDER_FACTS ? { ...facts, migration: lastMigration } : null;
        if (local !== null) return c.send({ return: local, ...(theirId !== undefined ? { id: theirId } : {}) });
        const id = nextId++;
        mine.set(id, theirId);
        answers.set(id, (answer) => {
          mine.delete(id);
          const { id: _ours, ...rest } = answer;
          if (client === c) c.send(theirId === undefined ? rest : { ...rest, id: theirId });
        });
        qemu.send({ ...message, id });
      },
      (why) => c.send({ error: { class: "GenericError", desc: `sgm's monitor holder: ${why}` } }),
    );
    client = c;
    onClient = (message) => c.send(message);
    socket.on("close", () => {
      if (client !== c) return;
      client = null;
      onClient = null;
      // what the departed client asked is answered to no one
      for (const id of mine.keys()) answers.set(id, () => {});
      checkDone();
    });
    c.send({ ...greeting, "sgm-holder": {} });
  }

  const code = await Promise.race([finished, qemuClosed.then(() => (held ? 0 : 69))]);
  if (server !== null) {
    (server as net.Server).close();
    rmSync(socketPath, { force: true });
  }
  (client as LineSocket | null)?.socket.destroy();
  qemu!.socket.destroy();
  return code;
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
