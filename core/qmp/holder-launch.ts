// Reaching a destination's monitor through its holder (monitor-holder.ts):
// the one already holding it, or one started now as a process of its own,
// so that it outlives whoever started it.

import { spawn } from "node:child_process";
import { resolve } from "node:path";
import { SgmError } from "../errors.ts";
import { CLOSED_BEFORE_GREETING, type QmpAddress, QmpClient, qmpAddressText } from "./client.ts";
import { HOLDER_BUSY } from "./monitor-holder.ts";

export interface HolderPlan {
  /** How to start a holder: it runs as `<command...> <qmp> <socket>`. */
  command: string[];
  /** Where the holder listens. */
  socketPath: string;
}

/** A unix socket's path must fit sockaddr_un (108 bytes with its NUL). */
const MAX_SOCKET_PATH = 107;
/** Beyond the holder's own bounds: 10 s for QEMU's greeting and for each of its three questions. */
const HOLDER_START_MS = 45_000;
/** A holder serving a client that is just going away, or ending as one comes: asked again for this long. */
const BUSY_RETRY_MS = 5_000;

/**
 * Connects through the holder at `plan.socketPath`, starting one if none
 * answers there. Where no holder can start, connects to QEMU directly and
 * `warn`s: the migration runs as well, but a gather that dies after
 * switchover may then find QEMU's main loop blocked and fail to resume it.
 */
export async function connectHeld(address: QmpAddress, given: HolderPlan, warn: (why: string) => void): Promise<QmpClient> {
  // the holder runs from /, to hold nothing mounted
  const plan = { ...given, socketPath: resolve(given.socketPath) };
  if (address.kind === "unix") address = { kind: "unix", path: resolve(address.path) };
  if (Buffer.byteLength(plan.socketPath) > MAX_SOCKET_PATH) {
    warn(`no monitor holder: its socket path ${plan.socketPath} is longer than ${MAX_SOCKET_PATH} bytes`);
    return QmpClient.connect(address);
  }
  const existing = await tryHolder(plan.socketPath);
  if (existing) return existing;
  const started = await startHolder(address, plan);
  if (started !== "ready") {
    warn(`no monitor holder: ${started}`);
    return QmpClient.connect(address);
  }
  const client = await tryHolder(plan.socketPath);
  if (!client) throw new SgmError("unavailable", `the monitor holder at ${plan.socketPath} said it was ready, then did not answer`);
  return client;
}

/** The holder listening at `path`, or null if none does; one that serves someone else past BUSY_RETRY_MS is an error. */
async function tryHolder(path: string): Promise<QmpClient | null> {
  const deadline = Date.now() + BUSY_RETRY_MS;
  for (;;) {
    try {
      const client = await QmpClient.connect({ kind: "unix", path });
      if (!client.held) {
        client.close();
        throw new SgmError("unavailable", `${path} is a QMP socket, but not sgm's monitor holder`);
      }
      return client;
    } catch (err) {
      if (!(err instanceof SgmError)) throw err;
      const code = (err.cause as NodeJS.ErrnoException | undefined)?.code;
      if (code === "ENOENT" || code === "ECONNREFUSED") return null;
      const passing = err.message.endsWith(CLOSED_BEFORE_GREETING) || err.message.includes(HOLDER_BUSY);
      if (!passing || Date.now() > deadline) throw err;
      await Bun.sleep(100);
    }
  }
}

/** Runs a holder in a session of its own; resolves with its first line: "ready", or why it could not hold the monitor. */
function startHolder(address: QmpAddress, plan: HolderPlan): Promise<string> {
  const [command, ...args] = plan.command;
  // its own session: no signal meant for the gather's process group (a terminal's, a job's, timeout's) reaches it
  const child = spawn(command!, [...args, qmpAddressText(address), plan.socketPath], {
    detached: true,
    stdio: ["ignore", "pipe", "ignore"],
    cwd: "/",
  });
  return new Promise((resolve) => {
    let text = "";
    const timer = setTimeout(() => child.kill("SIGKILL"), HOLDER_START_MS);
    let settled = false;
    const done = (line: string) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.stdout!.destroy();
      if (line === "ready") child.unref(); // it lives on alone: this process neither waits for it nor reads it again
      else child.kill("SIGKILL");
      resolve(line);
    };
    child.stdout!.on("data", (chunk: Buffer) => {
      text += chunk.toString("utf8");
      const nl = text.indexOf("\n");
      if (nl >= 0) done(text.slice(0, nl).trim());
    });
    child.on("error", (err) => done(`it could not start: ${err.message}`));
    child.on("exit", (code, signal) => done(`it ended before it said it held the monitor (${signal ?? `exit ${code}`})`));
  });
}
