// The flags that name a run, shared by `scatter` and `check`: the gather,
// the VMs, the relays and how to use them, and the key. `evacuate` names its
// VMs and gathers its own way and shares the rest.

import type { Command } from "cac";
import { SgmError } from "../core/errors.ts";
import { formatHostPort } from "../core/net/host-port.ts";
import type { PlanOptions } from "../core/scatter/survey.ts";
import { loadPsk } from "../core/wire/auth.ts";
import type { TlsFiles } from "../core/wire/connection.ts";
import { addTlsOptions, readTls, type TlsFlags } from "./tls-flags.ts";
import { parseCount, parseHostPort, parseHostPortFile, parseHostPortList, parseRate, parseVmPairs, requireString } from "./args.ts";

export interface RelayFlags extends TlsFlags {
  via?: unknown;
  viaFile?: unknown;
  replicas?: unknown;
  sourceRate?: unknown;
  allRelays?: boolean;
  pskFile?: unknown;
  waitGather?: unknown;
}

export interface RunFlags extends RelayFlags {
  to?: unknown;
  vm?: unknown;
}

export function addRunOptions(command: Command): Command {
  return addRelayOptions(
    command
      .option("--to <host:port>", "Address of the gather on the destination host")
      .option("--vm <name=qmp>", "A VM to evict: its name (as the gather knows it) and its QMP socket (repeatable)"),
  );
}

/** The relays, how to use them, the key, TLS, and how long to wait for a gather. */
export function addRelayOptions(command: Command): Command {
  return addTlsOptions(command)
    .option("--via <host:port,...>", "Relays to place pages on when the gather cannot take them yet (repeatable)")
    .option("--via-file <file>", "Relays listed in a file, one HOST:PORT a line (# starts a comment), besides any --via")
    .option("--replicas <n>", "Relays that hold each relayed page", { default: 1 })
    .option("--source-rate <rate>", "What this host sends at, e.g. 1.2GiB/s; by default measured with rate probes to the gather and relays")
    .option("--all-relays", "Use every reachable relay with room, not only the fewest that take the source's rate and hold what will not go direct")
    .option("--psk-file <file>", "File holding the pre-shared key of this run's sgm processes")
    .option("--wait-gather <seconds>", "How long to keep trying a gather that is not listening yet", { default: 30 });
}

/** Everything but the key, which is read last, once every flag has been checked. */
export function parseRunFlags(flags: RunFlags): Omit<PlanOptions, "psk"> {
  const gather = parseHostPort("--to", requireString("--to", flags.to));
  const vms = parseVmPairs(flags.vm);
  return { gather, vms, ...parseRelayFlags(flags) };
}

export function parseRelayFlags(flags: RelayFlags): Omit<PlanOptions, "psk" | "gather" | "vms"> {
  const relays = [
    ...parseHostPortList("--via", flags.via),
    ...(flags.viaFile === undefined ? [] : parseHostPortFile("--via-file", requireString("--via-file", flags.viaFile))),
  ];
  const seen = new Set<string>();
  for (const r of relays) {
    const key = formatHostPort(r.host, r.port);
    if (seen.has(key)) throw new SgmError("usage", `relay ${key} is given twice (--via, --via-file)`);
    seen.add(key);
  }
  return {
    relays,
    replicas: parseCount("--replicas", flags.replicas, 1, 16),
    gatherWaitMs: parseCount("--wait-gather", flags.waitGather, 0, 24 * 3600) * 1000,
    sourceRate: flags.sourceRate === undefined ? undefined : parseRate("--source-rate", String(flags.sourceRate)),
    allRelays: Boolean(flags.allRelays),
  };
}

/** The key and the TLS files, read once every other flag has been checked. */
export function readKey(flags: RelayFlags): { psk: Uint8Array; tls: TlsFiles | null } {
  return { psk: loadPsk(requireString("--psk-file", flags.pskFile)), tls: readTls(flags) };
}
