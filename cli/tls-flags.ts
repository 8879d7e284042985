// --tls-cert, --tls-key and --tls-ca, shared by every role: TLS under the
// pre-shared key on every connection, all three or none. Keys come from
// files only, never from argv or the environment.

import type { Command } from "cac";
import { SgmError } from "../core/errors.ts";
import type { TlsFiles } from "../core/wire/connection.ts";
import { readTextFile } from "./args.ts";

export interface TlsFlags {
  tlsCert?: unknown;
  tlsKey?: unknown;
  tlsCa?: unknown;
}

export function addTlsOptions(command: Command): Command {
  return command
    .option("--tls-cert <file>", "This host's certificate (PEM): with --tls-key and --tls-ca, every connection is TLS, both sides proving theirs")
    .option("--tls-key <file>", "The private key of --tls-cert (PEM)")
    .option("--tls-ca <file>", "The CA (PEM) that must have signed every peer's certificate");
}

/** The three files read, or null when none is given; some but not all is a usage error. */
export function readTls(flags: TlsFlags): TlsFiles | null {
  const given = { "--tls-cert": flags.tlsCert, "--tls-key": flags.tlsKey, "--tls-ca": flags.tlsCa };
  const named = Object.entries(given).filter(([, value]) => value !== undefined);
  if (named.length === 0) return null;
  const missing = Object.keys(given).filter((flag) => given[flag as keyof typeof given] === undefined);
  if (missing.length > 0) throw new SgmError("usage", `${named.map(([flag]) => flag).join(", ")} given without ${missing.join(", ")}: TLS needs all three`);
  const read = (flag: keyof typeof given) => readTextFile(flag, String(given[flag]));
  return { cert: read("--tls-cert"), key: read("--tls-key"), ca: read("--tls-ca") };
}
