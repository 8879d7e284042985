// `sgm check`: everything an eviction would check before it moves a byte,
// each as one verdict, without stopping at the first failure and without
// touching a VM. Sources (QEMU version, run state, migration capabilities),
// the gather (reachable, key accepted), each destination (the gather would
// take the VM: it waits with -incoming defer, can do postcopy, same machine
// type), the relays (reachable, key accepted, room for this run) and the
// plan (it fits).

import { randomBytes } from "node:crypto";
import { asSgmError, SgmError } from "../errors.ts";
import { formatHostPort } from "../net/host-port.ts";
import { parseQmpAddress } from "../qmp/client.ts";
import { formatBytes, formatRate } from "../units.ts";
import type { PeerConnection } from "../wire/connection.ts";
import { ask } from "./questions.ts";
import type { RelayPlan } from "./relay-plan.ts";
import { SourceQemu } from "./source-qemu.ts";
import { checkRelayArgs, connectGather, type PlanOptions, shortfallError, survey, surveyOptions } from "./survey.ts";

/** ok: it holds; warn: it does not, but an eviction would still start; fail: an eviction would not start. */
export type Verdict = "ok" | "warn" | "fail";

export interface Check {
  check: string;
  verdict: Verdict;
  detail: string;
}

export interface CheckReport {
  ok: boolean;
  checks: Check[];
  /** The plan, when every source, the gather and every destination passed. */
  plan: RelayPlan | null;
  /** 0 if an eviction would start, else the code the first failure would stop it with. */
  exitCode: number;
}

export async function preflight(options: PlanOptions): Promise<CheckReport> {
  checkRelayArgs(options);
  const checks: Check[] = [];
  let exitCode = 0;
  const pass = (check: string, detail: string) => checks.push({ check, verdict: "ok", detail });
  const warn = (check: string, detail: string) => checks.push({ check, verdict: "warn", detail });
  const fail = (check: string, err: unknown) => {
    const e = asSgmError(err);
    checks.push({ check, verdict: "fail", detail: e.message });
    if (exitCode === 0) exitCode = e.exitCode;
  };
  const finish = (plan: RelayPlan | null): CheckReport => ({ ok: exitCode === 0, checks, plan, exitCode });

  const opened = await Promise.allSettled(options.vms.map((vm) => SourceQemu.open(vm.name, parseQmpAddress(vm.qmp))));
  const sources = opened.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
  opened.forEach((r, i) => {
    const what = `source ${options.vms[i]!.name}`;
    if (r.status === "rejected") fail(what, r.reason);
    else pass(what, `QEMU ${r.value.info.qemuVersion}, ${r.value.info.machine}, ${r.value.info.runState}; its migration settings fit sgm`);
  });
  try {
    const where = formatHostPort(options.gather.host, options.gather.port);
    let gather: PeerConnection;
    try {
      gather = await connectGather(surveyOptions(options, true));
      pass(`gather ${where}`, "reachable, key accepted");
    } catch (err) {
      fail(`gather ${where}`, err);
      return finish(null);
    }
    try {
      for (const [vm, source] of sources.entries()) {
        const { qemuVersion: qemu, machine } = source.info;
        const answer = await ask(gather, "the gather", { t: "check", vm, name: source.name, qemu, machine }, "check-result", options.signal);
        const what = `destination ${source.name}`;
        if (answer.refusal) fail(what, new SgmError("unavailable", answer.refusal));
        else pass(what, `QEMU ${answer.qemu}, ${answer.machine}: waits with -incoming defer and can do postcopy (userfaultfd)`);
      }
    } finally {
      gather.close();
    }
    if (sources.length === 0) return finish(null);

    let plan: RelayPlan;
    try {
      const found = await survey(surveyOptions(options, true), sources, randomBytes(16).toString("hex"));
      found.gather.close();
      for (const r of found.relays) r.conn.close();
      plan = found.plan!;
    } catch (err) {
      fail("plan", err);
      return finish(null);
    }
    for (const r of plan.chosen) pass(`relay ${r.address}`, `reachable, key accepted, ${formatBytes(r.free)} free for this run, ${formatRate(r.rate)}`);
    for (const r of plan.leftOut) {
      if (r.reason.startsWith("not needed")) pass(`relay ${r.address}`, `reachable, key accepted; ${r.reason}`);
      else warn(`relay ${r.address}`, r.reason);
    }
    const short = shortfallError(plan);
    if (short) fail("plan", short);
    else pass("plan", `${formatBytes(plan.bytes)} to scatter, ${plan.chosen.length} ${plan.chosen.length === 1 ? "relay" : "relays"}; eviction expected in ${(plan.expectedEvictionMs / 1000).toFixed(1)} s`);
    return finish(plan);
  } finally {
    for (const s of sources) s.close();
  }
}
