// How `sgm scatter --plan` shows its plan to a person.

import type { RelayPlan } from "../core/scatter/relay-plan.ts";
import { formatBytes, formatRate } from "../core/units.ts";
import { formatMs, info } from "./output.ts";

export function renderPlan(plan: RelayPlan): void {
  const vms = plan.vms.map((vm) => `${vm.name} ${formatBytes(vm.bytes)}${vm.balloonedBytes > 0 ? ` (${formatBytes(vm.balloonedBytes)} ballooned)` : ""}`);
  info(`plan: ${formatBytes(plan.bytes)} to scatter (${vms.join(", ")}; RAM less ballooned, plus a redirty margin)`);
  info(`  source sends ${formatRate(plan.sourceRate)} (${plan.sourceRateFrom}); the destination takes ${formatRate(plan.destinationRate)} of it`);
  for (const r of plan.chosen) {
    info(`  relay ${r.address}: ${formatBytes(r.expectedBytes)} expected, ${formatRate(r.rate)}, ${formatBytes(r.free)} free`);
  }
  for (const r of plan.leftOut) info(`  relay ${r.address} left out: ${r.reason}`);
  info(
    `  ${formatBytes(plan.directBytes)} direct, ${formatBytes(plan.relayedBytes)} through relays` +
      (plan.replicas > 1 ? ` (${plan.replicas} copies each)` : "") +
      `; eviction expected in ${formatMs(plan.expectedEvictionMs)}, bound ${formatMs(plan.boundMs)} (the source's rate)`,
  );
  info(plan.shortfall ? `plan falls short: ${plan.shortfall.message}` : "plan fits: the eviction would start");
}
