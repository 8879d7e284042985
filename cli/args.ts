// Parsing of flag values shared by the subcommands. Each failure is a usage
// error naming the flag and the value.

import { readFileSync } from "node:fs";
import { SgmError } from "../core/errors.ts";
import { type HostPort, parseHostPort as parse } from "../core/net/host-port.ts";

export function parseHostPort(flag: string, text: string): HostPort {
  const hp = parse(text);
  if (!hp) throw new SgmError("usage", `${flag} '${text}': expected HOST:PORT`);
  return hp;
}

export function parseHostPortList(flag: string, values: unknown): HostPort[] {
  return asStrings(values)
    .flatMap((v) => v.split(","))
    .filter((v) => v !== "")
    .map((v) => parseHostPort(flag, v));
}

/**
 * A fleet's relay list kept in one file: one HOST:PORT a line; blank lines
 * and everything after a # are ignored.
 */
export function parseHostPortFile(flag: string, path: string): HostPort[] {
  const out: HostPort[] = [];
  readTextFile(flag, path).split("\n").forEach((raw, i) => {
    const line = raw.replace(/#.*/, "").trim();
    if (line === "") return;
    const hp = parse(line);
    if (!hp) throw new SgmError("usage", `${flag} ${path} line ${i + 1}: '${line}': expected HOST:PORT`);
    out.push(hp);
  });
  return out;
}

const UNITS: Record<string, number> = { "": 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

/** "8GiB", "512M", "1.5g", "4096" (bytes); binary units. */
export function parseSize(flag: string, text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$/i.exec(text.trim());
  if (!m) throw new SgmError("usage", `${flag} '${text}': expected a size such as 8GiB or 512MiB`);
  const bytes = Math.floor(Number(m[1]) * UNITS[m[2]!.toLowerCase()]!);
  if (!(bytes > 0)) throw new SgmError("usage", `${flag} '${text}': must be more than zero`);
  return bytes;
}

/** A rate in bytes per second: "100MiB/s", "100M", "1g". */
export function parseRate(flag: string, text: string): number {
  return parseSize(flag, text.replace(/\/s$/i, ""));
}

export function parseCount(flag: string, text: unknown, min: number, max: number): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < min || n > max) {
    throw new SgmError("usage", `${flag} '${String(text)}': expected a whole number from ${min} to ${max}`);
  }
  return n;
}

export interface VmPair {
  name: string;
  qmp: string;
}

export const VM_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function parseVmPairs(values: unknown): VmPair[] {
  const pairs = asStrings(values).map((text) => {
    const eq = text.indexOf("=");
    const name = text.slice(0, eq);
    const qmp = text.slice(eq + 1);
    if (eq < 0 || !VM_NAME.test(name) || qmp === "") {
      throw new SgmError("usage", `--vm '${text}': expected NAME=QMP_SOCKET (NAME: letters, digits, . _ -)`);
    }
    return { name, qmp };
  });
  if (pairs.length === 0) throw new SgmError("usage", "--vm NAME=QMP_SOCKET is required");
  const seen = new Set<string>();
  for (const { name } of pairs) {
    if (seen.has(name)) throw new SgmError("usage", `--vm: '${name}' is given twice`);
    seen.add(name);
  }
  return pairs;
}

export function requireString(flag: string, value: unknown): string {
  if (typeof value !== "string" || value === "") {
    if (Array.isArray(value)) throw new SgmError("usage", `${flag} is given more than once`);
    throw new SgmError("usage", `${flag} is required`);
  }
  return value;
}

export function readTextFile(flag: string, path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch (err) {
    throw new SgmError("usage", `${flag} '${path}': cannot read it (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
}

function asStrings(values: unknown): string[] {
  if (values === undefined) return [];
  return (Array.isArray(values) ? values : [values]).map(String);
}
