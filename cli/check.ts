// sgm check: the preflight of an eviction, run where scatter would run.
// One line per check with its verdict; exit 0 only if an eviction would start.

import type { CAC } from "cac";
import kleur from "kleur";
import { type CheckReport, preflight, type Verdict } from "../core/scatter/preflight.ts";
import { info, printJson } from "./output.ts";
import { addRunOptions, parseRunFlags, readKey, type RunFlags } from "./run-flags.ts";

interface CheckFlags extends RunFlags {
  json?: boolean;
}

export function registerCheck(cli: CAC, signal: AbortSignal): void {
  addRunOptions(
    cli
      .command("check", "Check, changing nothing, that an eviction with these flags would start: sources, gather, destinations, relays, plan")
      .usage("check --to HOST:PORT --vm NAME=QMP_SOCKET [--vm ...] --psk-file FILE [scatter's relay options]"),
  )
    .option("--json", "Print the checks as JSON on stdout")
    .example("sgm check --to dst:7700 --vm web1=/run/qemu/web1.qmp --via-file /etc/sgm/relays --psk-file /etc/sgm/psk && sgm scatter ...")
    .action(async (flags: CheckFlags) => {
      const run = parseRunFlags(flags);
      const report = await preflight({ ...run, ...readKey(flags), signal });
      render(report);
      if (flags.json) printJson(report);
      return report.exitCode;
    });
}

const MARK: Record<Verdict, (text: string) => string> = {
  ok: (t) => kleur.green(t),
  warn: (t) => kleur.yellow(t),
  fail: (t) => kleur.red(t),
};

function render(report: CheckReport): void {
  for (const c of report.checks) info(`${MARK[c.verdict](c.verdict.padEnd(4))}  ${c.check}: ${c.detail}`);
  info(report.ok ? "an eviction would start" : `an eviction would not start (exit ${report.exitCode})`);
}
