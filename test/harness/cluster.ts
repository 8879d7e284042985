// A whole eviction on this machine: source and destination QEMUs running
// the test guest, and the compiled sgm's gather and scatter as separate
// processes between them.

import { dirname, join } from "node:path";
import { startSgm, type RunResult, type SgmProcess } from "./sgm.ts";
import { checkReport } from "./report-schemas.ts";
import { compareGuestMemory, dumpMemory, type MemoryComparison } from "./memory.ts";
import { type GuestLayout, type QemuBinary, TestVm, type VmOptions } from "./qemu.ts";
import { freePort } from "./tmp.ts";

export interface VmPair {
  name: string;
  source: TestVm;
  destination: TestVm;
  layout: GuestLayout;
}

export interface PairOptions extends Omit<VmOptions, "dir" | "name" | "incoming" | "binary"> {
  sourceBinary?: QemuBinary;
  destinationBinary?: QemuBinary;
}

/**
 * Starts a source VM and its waiting destination; resolves once the guest
 * filled its RAM. The guest churns 200 steps a second unless told otherwise.
 */
export async function startPair(dir: string, name: string, options: PairOptions = {}): Promise<VmPair> {
  const { sourceBinary, destinationBinary, ...rest } = options;
  const vm = { churn: 200, ...rest };
  const [source, destination] = await Promise.all([
    TestVm.start({ ...vm, dir, name, binary: sourceBinary }),
    TestVm.start({ ...vm, dir, name: `${name}-in`, incoming: true, binary: destinationBinary }),
  ]);
  const layout = await source.waitFilled();
  return { name, source, destination, layout };
}

export async function writePsk(dir: string, key = "sgm test key 0123456789abcdef"): Promise<string> {
  const path = join(dir, "psk");
  await Bun.write(path, `${key}\n`);
  return path;
}

/** Starts `sgm gather` for the pairs and waits until it listens. */
export async function startGather(
  pairs: VmPair[],
  psk: string,
  extra: string[] = [],
  listenPort?: number,
  env: Record<string, string> = {},
): Promise<{ gather: SgmProcess; port: number }> {
  const port = listenPort ?? (await freePort());
  const gather = await startSgm(gatherArgs(pairs, psk, port, extra), env);
  await gather.waitStderr(/listening on/);
  return { gather, port };
}

/** `sgm gather --resume` with the flags a gather of startGather had, after it died. */
export function resumeGather(pairs: VmPair[], psk: string, port: number, extra: string[] = []): Promise<SgmProcess> {
  return startSgm([...gatherArgs(pairs, psk, port, extra), "--resume"]);
}

function gatherArgs(pairs: VmPair[], psk: string, port: number, extra: string[]): string[] {
  return [
    "gather",
    "--listen",
    `127.0.0.1:${port}`,
    ...pairs.flatMap((p) => ["--vm", `${p.name}=${p.destination.qmpPath}`]),
    "--psk-file",
    psk,
    "--state-dir",
    join(dirname(psk), "gather-state"),
    "--json",
    ...extra,
  ];
}

export function startScatter(pairs: VmPair[], port: number, psk: string, extra: string[] = [], env: Record<string, string> = {}): Promise<SgmProcess> {
  return startSgm([
    "scatter",
    "--to",
    `127.0.0.1:${port}`,
    ...pairs.flatMap((p) => ["--vm", `${p.name}=${p.source.qmpPath}`]),
    "--psk-file",
    psk,
    "--json",
    ...extra,
  ], env);
}

/** The JSON report a role printed on stdout, checked against its published schema (docs/schemas/). */
export function report<T>(result: RunResult): T {
  let parsed: unknown;
  try {
    parsed = JSON.parse(result.stdout);
  } catch {
    throw new Error(`no JSON report (exit ${result.code}); stderr:\n${result.stderr}`);
  }
  checkReport(result.args, parsed);
  return parsed as T;
}

/** Starts `sgm relay` on a free loopback port; resolves once it listens. */
export async function startRelay(
  psk: string,
  capacity = "1GiB",
  extra: string[] = [],
  env: Record<string, string> = {},
): Promise<{ relay: SgmProcess; address: string }> {
  const relay = await startSgm(["relay", "--listen", "127.0.0.1:0", "--capacity", capacity, "--psk-file", psk, ...extra], env);
  const m = await relay.waitStderr(/relay listening on (\S+)/);
  return { relay, address: m[1]! };
}

/**
 * Resolves once the scatter (run with SGM_TRACE set) has read the relay's
 * acknowledgements of `mib` MiB: a relay killed then goes with the only copy
 * of content the run counts on. What the relay itself took is not that: a
 * busy scatter may not have read its acknowledgements yet, and the relay
 * would go with nothing the run counted on.
 */
export async function relayAcknowledged(scatter: SgmProcess, relay: string, mib: number): Promise<void> {
  // the scatter traces each whole MiB as it passes: an acknowledgement covers one batch, at most 64 pages
  const address = relay.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  await scatter.waitStderr(new RegExp(`^sgm-trace \\d+ \\d+ relay ${address}: ${mib} MiB acknowledged$`, "m"), 60_000);
}

export interface Arrival {
  /** The destination guest checked every page against its own counters. */
  verified: boolean;
  comparison: MemoryComparison;
}

/**
 * Halts the destination guest, which checks every page itself, then
 * compares its memory with the source's final memory (the source must have
 * been kept, --keep-source).
 */
export async function haltAndCompare(pair: VmPair, dir: string): Promise<Arrival> {
  const halted = await pair.destination.haltGuest();
  const comparison = compareGuestMemory(
    await dumpMemory(pair.source, dir, "final"),
    await dumpMemory(pair.destination, dir, "halted"),
    pair.layout,
  );
  return { verified: halted.verified, comparison };
}
