// How sgm talks to its user: human lines (coloured on a terminal) on stderr,
// the machine-readable report alone on stdout with --json.

import { readFileSync } from "node:fs";
import kleur from "kleur";
import { asSgmError } from "../core/errors.ts";
import { bytesReceivedNatively } from "../core/net/socket-receive.ts";
import { bytesSentNatively } from "../core/net/socket-send.ts";
import { pagesHashedByHelpers } from "../core/dedup/native-digest.ts";

kleur.enabled = Boolean(process.stderr.isTTY) && !process.env.NO_COLOR;

let quiet = false;
let lineWriter: ((text: string) => void) | null = null;

/** --quiet: from now on info lines are dropped; warnings and errors still print. */
export function setQuiet(on: boolean): void {
  quiet = on;
}

/** Where stderr lines go while a live progress display holds the bottom of the terminal (null: straight to stderr). */
export function setLineWriter(writer: ((text: string) => void) | null): void {
  lineWriter = writer;
}

function writeLine(text: string): void {
  if (lineWriter) lineWriter(text);
  else process.stderr.write(text);
}

export function info(line: string): void {
  if (!quiet) writeLine(`${kleur.dim("sgm:")} ${line}\n`);
}

export function warn(line: string): void {
  writeLine(`${kleur.yellow("sgm: warning:")} ${line}\n`);
}

/** Prints the error on one line and returns the exit code it maps to. */
export function reportError(err: unknown): number {
  const e = asSgmError(err);
  writeLine(`${kleur.red("sgm: error:")} ${e.message}\n`);
  if (e.kind === "internal" && process.env.SGM_DEBUG && e.cause instanceof Error) {
    process.stderr.write(`${e.cause.stack}\n`);
  }
  return e.exitCode;
}

/**
 * The final report on stdout, with what this process cost by its own
 * accounting: CPU seconds (user, system), peak resident memory, and page
 * faults (each first touch of fresh memory, tens of microseconds on some
 * virtual machines), how much it read and wrote past Bun's sockets, and
 * how many pages the hash helpers hashed (its digest threads).
 */
export function printJson(report: object): void {
  const cpu = process.cpuUsage();
  const usage = process.resourceUsage();
  const resources = {
    cpuUserSeconds: cpu.user / 1e6,
    cpuSystemSeconds: cpu.system / 1e6,
    mainThreadCpuSeconds: mainThreadCpuSeconds(),
    peakRssBytes: usage.maxRSS * 1024,
    minorPageFaults: usage.minorPageFault,
    bytesReceivedNatively: bytesReceivedNatively(),
    bytesSentNatively: bytesSentNatively(),
    pagesHashedByHelpers: pagesHashedByHelpers(),
  };
  process.stdout.write(`${JSON.stringify({ ...report, process: resources }, null, 2)}\n`);
}

/**
 * CPU seconds (user and system) of the thread that runs sgm's event loop,
 * whose pace bounds a role's whatever other threads do; null without /proc.
 */
function mainThreadCpuSeconds(): number | null {
  try {
    const stat = readFileSync(`/proc/self/task/${process.pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // utime and stime, fields 14 and 15 of proc(5), in clock ticks of 1/100 s on Linux
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return null;
  }
}

export function formatMs(ms: number): string {
  return ms >= 10_000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`;
}
