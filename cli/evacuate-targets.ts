// Which VMs `sgm evacuate` empties this host of, and where each goes: a map
// file of `NAME QMP_SOCKET GATHER_HOST:PORT` lines, or VMs named with --vm
// or found as the sockets in --qmp-dir (a management layer's, e.g. under
// /run), all to one --to.

import { readdirSync, statSync } from "node:fs";
import { basename, extname, join } from "node:path";
import { SgmError } from "../core/errors.ts";
import { parseHostPort as parse } from "../core/net/host-port.ts";
import type { EvacuationTarget } from "../core/scatter/evacuation.ts";
import { parseHostPort, parseVmPairs, readTextFile, requireString, VM_NAME } from "./args.ts";

export interface TargetFlags {
  map?: unknown;
  to?: unknown;
  vm?: unknown;
  qmpDir?: unknown;
}

export function parseTargets(flags: TargetFlags): EvacuationTarget[] {
  const named = flags.vm !== undefined || flags.qmpDir !== undefined;
  if (flags.map !== undefined) {
    if (named || flags.to !== undefined) throw new SgmError("usage", "--map names every VM and its gather: not with --vm, --qmp-dir or --to");
    return parseMapFile(requireString("--map", flags.map));
  }
  if (!named) throw new SgmError("usage", "name the VMs: --map FILE, or --vm NAME=QMP_SOCKET and/or --qmp-dir DIR with --to HOST:PORT");
  const gather = parseHostPort("--to", requireString("--to", flags.to));
  const vms = [...(flags.vm === undefined ? [] : parseVmPairs(flags.vm)), ...(flags.qmpDir === undefined ? [] : socketsIn(requireString("--qmp-dir", flags.qmpDir)))];
  const seen = new Set<string>();
  for (const vm of vms) {
    if (seen.has(vm.name)) throw new SgmError("usage", `VM '${vm.name}' is named twice (--vm, --qmp-dir)`);
    seen.add(vm.name);
  }
  return vms.map((vm) => ({ ...vm, gather }));
}

/** Blank lines and everything after a # are ignored. */
function parseMapFile(path: string): EvacuationTarget[] {
  const targets: EvacuationTarget[] = [];
  const seen = new Set<string>();
  readTextFile("--map", path)
    .split("\n")
    .forEach((raw, i) => {
      const line = raw.replace(/#.*/, "").trim();
      if (line === "") return;
      const where = `--map ${path} line ${i + 1}`;
      const fields = line.split(/\s+/);
      const gather = fields.length === 3 ? parse(fields[2]!) : null;
      if (fields.length !== 3 || !VM_NAME.test(fields[0]!) || !gather) {
        throw new SgmError("usage", `${where}: '${line}': expected NAME QMP_SOCKET GATHER_HOST:PORT (NAME: letters, digits, . _ -)`);
      }
      if (seen.has(fields[0]!)) throw new SgmError("usage", `${where}: VM '${fields[0]}' is named twice`);
      seen.add(fields[0]!);
      targets.push({ name: fields[0]!, qmp: fields[1]!, gather });
    });
  if (targets.length === 0) throw new SgmError("usage", `--map ${path}: names no VM`);
  return targets;
}

/** Every unix socket in the directory, named for its file less the extension (web1.qmp is VM web1). */
function socketsIn(dir: string): Array<{ name: string; qmp: string }> {
  let entries: string[];
  try {
    entries = readdirSync(dir).sort();
  } catch (err) {
    throw new SgmError("usage", `--qmp-dir '${dir}': cannot read it (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
  const found = entries.flatMap((entry) => {
    const path = join(dir, entry);
    const isSocket = (() => {
      try {
        return statSync(path).isSocket();
      } catch {
        return false;
      }
    })();
    const name = basename(entry, extname(entry));
    return isSocket && VM_NAME.test(name) ? [{ name, qmp: path }] : [];
  });
  if (found.length === 0) throw new SgmError("usage", `--qmp-dir '${dir}': no QMP sockets in it`);
  return found;
}
