// sgm gather: runs on the destination host.

import { join } from "node:path";
import { SgmError } from "../core/errors.ts";
import type { CAC } from "cac";
import { type GatherReport, runGather } from "../core/gather/engine.ts";
import { loadPsk } from "../core/wire/auth.ts";
import { addTlsOptions, readTls, type TlsFlags } from "./tls-flags.ts";
import { parseCount, parseHostPort, parseRate, parseVmPairs, requireString } from "./args.ts";
import { formatBytes } from "../core/units.ts";
import { formatMs, info, printJson, setQuiet, warn } from "./output.ts";
import { withProgress } from "./progress.ts";
import { announceReady, parseReadyFd } from "./ready-fd.ts";
import { selfCommand } from "./self.ts";
import { formatHostPort } from "../core/net/host-port.ts";

interface GatherFlags extends TlsFlags {
  listen?: unknown;
  vm?: unknown;
  pskFile?: unknown;
  postcopyBandwidth?: unknown;
  maxRate?: unknown;
  json?: boolean;
  quiet?: boolean;
  readyFd?: unknown;
  stateDir?: unknown;
  resume?: boolean;
  digestThreads?: unknown;
}

/**
 * On tmpfs: the state matters only while the destination QEMU lives, which
 * no reboot survives. A user other than root has one only in a session
 * (XDG_RUNTIME_DIR); elsewhere --state-dir must say where, or none.
 */
function defaultStateDir(): string | null {
  if (process.getuid?.() === 0) return "/run/sgm";
  return process.env.XDG_RUNTIME_DIR ? join(process.env.XDG_RUNTIME_DIR, "sgm") : null;
}

export function registerGather(cli: CAC, signal: AbortSignal): void {
  const command = cli
    .command("gather", "Receive VMs: gather their pages and feed destination QEMUs waiting with -incoming defer")
    .usage("gather --listen HOST:PORT --vm NAME=QMP_SOCKET [--vm ...] --psk-file FILE [options]")
    .option("--listen <host:port>", "Address to listen on for the scatter")
    .option("--vm <name=qmp>", "A VM to receive: its name and the QMP socket of its destination QEMU (repeatable)")
    .option("--psk-file <file>", "File holding the pre-shared key of this run's sgm processes");
  addTlsOptions(command)
    .option("--max-rate <rate>", "Receive at most this much per second, from the scatter and relays together, e.g. 100MiB/s")
    .option("--postcopy-bandwidth <rate>", "Cap the background push to each destination QEMU after switchover, e.g. 200MiB/s (requested pages are never held back)")
    .option("--digest-threads <n>", "Threads that check the scatter's pages against their digests beside the one that feeds QEMU (default 0: that one; where the native digest does not run, each thread costs about 20 MiB here)")
    .option("--state-dir <dir>", "Where to save each VM's state once it runs here, so a gather restarted with --resume can finish it; 'none' saves nothing (default /run/sgm for root, else $XDG_RUNTIME_DIR/sgm)")
    .option("--resume", "Finish the VMs a gather that died after switchover left paused at their destinations, from the states it saved; give the same flags as to it")
    .option("--json", "Print the final report as JSON on stdout")
    .option("--quiet", "Print no progress and no report lines on stderr; warnings and errors still")
    .option("--ready-fd <n>", "Once listening, write 'ready HOST:PORT' and a newline to this file descriptor and close it")
    .example("sgm gather --listen 0.0.0.0:7700 --vm web1=/run/qemu/web1-in.qmp --psk-file /etc/sgm/psk")
    .action(async (flags: GatherFlags) => {
      const listen = parseHostPort("--listen", requireString("--listen", flags.listen));
      const vms = parseVmPairs(flags.vm);
      const maxRate = flags.maxRate === undefined ? undefined : parseRate("--max-rate", String(flags.maxRate));
      const postcopyBandwidth = flags.postcopyBandwidth === undefined ? undefined : parseRate("--postcopy-bandwidth", String(flags.postcopyBandwidth));
      if (flags.resume && flags.readyFd !== undefined) throw new SgmError("usage", "--ready-fd with --resume: a resumed gather listens for no scatter");
      const stateDir = parseStateDir(flags.stateDir, Boolean(flags.resume));
      // not from the cores as scatter and relay do: a destination may be short of memory, and the gather is not what evicts
      const digestThreads = flags.digestThreads === undefined ? 0 : parseCount("--digest-threads", flags.digestThreads, 0, 64);
      const psk = loadPsk(requireString("--psk-file", flags.pskFile));
      const tls = readTls(flags);
      const readyFd = parseReadyFd(flags.readyFd);
      setQuiet(Boolean(flags.quiet));
      const report = await withProgress("gathered", Boolean(flags.quiet), (onProgress) =>
        runGather({
          ...{ listen, vms, psk, tls, maxRate, postcopyBandwidth, digestThreads, stateDir, resume: Boolean(flags.resume), signal, log: info },
          holderCommand: [...selfCommand(), "hold-monitor"],
          onListening: (port) => {
            if (readyFd !== undefined) announceReady(readyFd, formatHostPort(listen.host, port));
          },
          onProgress,
        }),
      );
      render(report);
      if (flags.json) printJson(report);
      return report.exitCode;
    });
}

function parseStateDir(flag: unknown, resume: boolean): string | null {
  const given = flag === undefined ? undefined : requireString("--state-dir", flag);
  if (given === "none") {
    if (resume) throw new SgmError("usage", "--resume needs the --state-dir the gather before it saved to, not 'none'");
    return null;
  }
  const dir = given ?? defaultStateDir();
  if (dir === null) {
    if (resume) throw new SgmError("usage", "--resume needs --state-dir: no default here (not root, no XDG_RUNTIME_DIR)");
    warn("no --state-dir and no default (not root, no XDG_RUNTIME_DIR): if this gather dies after switchover, its VMs cannot be resumed");
  }
  return dir;
}

function render(report: GatherReport): void {
  for (const vm of report.vms) {
    if (vm.ok) {
      info(
        `${vm.name}: completed in ${formatMs(vm.totalMs ?? 0)}, downtime ${vm.downtimeMs === null ? "unknown" : formatMs(vm.downtimeMs)}; ` +
          `${formatBytes(vm.bytes.toQemu)} to QEMU ${vm.qemu.destination}, ${vm.pages.requests} page requests`,
      );
    } else {
      info(`${vm.name}: NOT completed: ${vm.error}`);
    }
  }
  info(
    `received ${formatBytes(report.bytesFromScatter)} from the scatter` +
      (report.relays.length ? ` and ${report.relays.map((r) => `${formatBytes(r.bytesIn)} from ${r.address}`).join(", ")}` : ""),
  );
}
