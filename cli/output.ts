// How sgm talks to its user: human lines (coloured on a terminal) on stderr,
// the machine-readable report alone on stdout with --json.

import kleur from "kleur";
import { asSgmError } from "../core/errors.ts";

kleur.enabled = Boolean(process.stderr.isTTY) && !process.env.NO_COLOR;

export function info(line: string): void {
  process.stderr.write(`${kleur.dim("sgm:")} ${line}\n`);
}

export function warn(line: string): void {
  process.stderr.write(`${kleur.yellow("sgm: warning:")} ${line}\n`);
}

/** Prints the error on one line and returns the exit code it maps to. */
export function reportError(err: unknown): number {
  const e = asSgmError(err);
  process.stderr.write(`${kleur.red("sgm: error:")} ${e.message}\n`);
  if (e.kind === "internal" && process.env.SGM_DEBUG && e.cause instanceof Error) {
    process.stderr.write(`${e.cause.stack}\n`);
  }
  return e.exitCode;
}

export function printJson(report: unknown): void {
  process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
}

export function formatMs(ms: number): string {
  return ms >= 10_000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`;
}
