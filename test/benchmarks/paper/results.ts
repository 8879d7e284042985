// The benchmark's figures: every run as measured, then per VM count and
// method the median of the repetitions with their min and max, as a
// markdown table, JSON, and a chart (Vega-Lite, rendered headless to PNG).

import { Resvg } from "@resvg/resvg-js";
import * as vega from "vega";
import * as vl from "vega-lite";
import type { CpuSeconds, Method, Timing } from "./methods.ts";

export interface LinkBytes {
  tx: number;
  rx: number;
}

export interface RunRecord {
  vms: number;
  rep: number;
  method: string;
  /** Null when the method did not finish: its error says why. */
  timing: Timing | null;
  error?: string;
  /** Every guest checked itself at the destination and ran on. */
  intact: boolean;
  verifyError?: string;
  /** Bytes on each host's link during the run. */
  links: Record<string, LinkBytes>;
  /** Wall time of the migration, and the CPU each kind of process spent in it. */
  wallMs: number;
  cpu: CpuSeconds;
  /** The same until the source host was evicted (null if it never was). */
  cpuToEviction: CpuSeconds | null;
  /** What sgm's scatter logged, for seeing where a run's time went. */
  log: string[];
}

export interface Stat {
  median: number;
  min: number;
  max: number;
}

export interface Summary {
  vms: number;
  method: string;
  label: string;
  runs: number;
  /** Runs that did not finish, or whose guests did not arrive intact. */
  failed: number;
  evictionS: Stat | null;
  totalS: Stat | null;
  downtimeMs: Stat | null;
  sourceLinkMiB: Stat;
  destinationLinkMiB: Stat;
  /** Into all relays together. */
  relaysInMiB: Stat;
  /** The time the source's link needs for the VMs' distinct non-zero bytes. */
  boundS: number;
  /** Median eviction time over the bound. */
  evictionOverBound: number | null;
  /** Medians of the CPU seconds spent, and of the CPU seconds the machine had (cores × wall). */
  cpu: CpuSeconds;
  cpuAvailable: number;
  /** The same until eviction; the machine had cores × eviction time. */
  cpuToEviction: CpuSeconds | null;
  cpuAvailableToEviction: number | null;
}

const CPU_ROLES = ["sourceQemu", "destinationQemu", "scatter", "relays", "gather"] as const;

function medianCpu(all: CpuSeconds[]): CpuSeconds | null {
  if (all.length === 0) return null;
  return Object.fromEntries(CPU_ROLES.map((role) => [role, stat(all.map((c) => c[role]))!.median])) as unknown as CpuSeconds;
}

export function stat(values: number[]): Stat | null {
  if (values.length === 0) return null;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
  return { median, min: sorted[0]!, max: sorted.at(-1)! };
}

const MiB = 2 ** 20;

export function summarize(runs: RunRecord[], methods: readonly Method[], boundS: (vms: number) => number): Summary[] {
  const out: Summary[] = [];
  for (const vms of [...new Set(runs.map((r) => r.vms))]) {
    for (const m of methods) {
      const mine = runs.filter((r) => r.vms === vms && r.method === m.id);
      if (mine.length === 0) continue;
      const done = mine.filter((r) => r.timing !== null);
      const relayHosts = Object.keys(mine[0]!.links).filter((h) => h.startsWith("relay"));
      const evictionS = stat(done.map((r) => r.timing!.evictionMs / 1000));
      out.push({
        vms,
        method: m.id,
        label: m.label,
        runs: mine.length,
        failed: mine.filter((r) => r.timing === null || !r.intact).length,
        evictionS,
        totalS: stat(done.map((r) => r.timing!.totalMs / 1000)),
        downtimeMs: stat(done.map((r) => r.timing!.downtimeMs)),
        sourceLinkMiB: stat(mine.map((r) => r.links.src!.tx / MiB))!,
        destinationLinkMiB: stat(mine.map((r) => r.links.dst!.rx / MiB))!,
        relaysInMiB: stat(mine.map((r) => relayHosts.reduce((n, h) => n + r.links[h]!.rx, 0) / MiB))!,
        boundS: boundS(vms),
        evictionOverBound: evictionS ? evictionS.median / boundS(vms) : null,
        cpu: medianCpu(mine.map((r) => r.cpu))!,
        cpuAvailable: stat(mine.map((r) => (r.wallMs / 1000) * navigator.hardwareConcurrency))!.median,
        cpuToEviction: medianCpu(done.flatMap((r) => (r.cpuToEviction ? [r.cpuToEviction] : []))),
        cpuAvailableToEviction: evictionS ? evictionS.median * navigator.hardwareConcurrency : null,
      });
    }
  }
  return out;
}

function cell(s: Stat | null, digits: number): string {
  if (!s) return "did not finish";
  const f = (x: number) => x.toFixed(digits);
  return s.min === s.max ? f(s.median) : `${f(s.median)} (${f(s.min)}–${f(s.max)})`;
}

export function markdownTable(summaries: Summary[]): string {
  const lines: string[] = [];
  for (const vms of [...new Set(summaries.map((s) => s.vms))]) {
    const rows = summaries.filter((s) => s.vms === vms);
    lines.push(
      `**${vms} VM${vms > 1 ? "s" : ""}** — source-link bound ${rows[0]!.boundS.toFixed(2)} s`,
      "",
      "| method | eviction s | total s | downtime ms | source link MiB | destination link MiB | into relays MiB | eviction / bound | failed |",
      "|---|---|---|---|---|---|---|---|---|",
    );
    for (const s of rows) {
      lines.push(
        `| ${s.label} | ${cell(s.evictionS, 2)} | ${cell(s.totalS, 2)} | ${cell(s.downtimeMs, 0)} | ${cell(s.sourceLinkMiB, 0)} | ${cell(s.destinationLinkMiB, 0)} | ${cell(s.relaysInMiB, 0)} | ${s.evictionOverBound === null ? "-" : `${s.evictionOverBound.toFixed(1)}x`} | ${s.failed}/${s.runs} |`,
      );
    }
    lines.push("");
  }
  return lines.join("\n");
}

/**
 * Where each migration's CPU went, against what the machine had: a profile
 * at the grain of processes. Until eviction is what decides eviction time;
 * on one machine every role competes for the same cores.
 */
export function cpuTable(summaries: Summary[]): string {
  const cores = navigator.hardwareConcurrency;
  const lines = [
    `CPU seconds (median) until the source host was evicted, and over the whole migration, against what ${cores} cores gave in that time:`,
    "",
    "| VMs | method | source QEMUs | destination QEMUs | scatter | relays | gather | all | cores × time |",
    "|---|---|---|---|---|---|---|---|---|",
  ];
  const row = (c: CpuSeconds | null, had: number | null) => {
    if (!c || had === null) return "- | - | - | - | - | - | -";
    const all = CPU_ROLES.reduce((n, role) => n + c[role], 0);
    return [...CPU_ROLES.map((role) => c[role]), all, had].map((x) => x.toFixed(1)).join(" | ");
  };
  for (const s of summaries) {
    lines.push(`| ${s.vms} | ${s.label}, until eviction | ${row(s.cpuToEviction, s.cpuAvailableToEviction)} |`);
    lines.push(`| ${s.vms} | ${s.label}, whole migration | ${row(s.cpu, s.cpuAvailable)} |`);
  }
  return `${lines.join("\n")}\n`;
}

/** The ratios the issue asks for, per VM count: what sgm with 3 relays gains. */
export function ratios(summaries: Summary[]): string[] {
  const out: string[] = [];
  for (const vms of [...new Set(summaries.map((s) => s.vms))]) {
    const get = (id: string) => summaries.find((s) => s.vms === vms && s.method === id);
    const sgm = get("sgm-3");
    if (!sgm?.evictionS) continue;
    const parts = [`${vms} VM${vms > 1 ? "s" : ""}: sgm with 3 relays evicts`];
    for (const [id, name] of [["precopy", "pre-copy"], ["postcopy", "post-copy"]] as const) {
      const other = get(id);
      if (!other) continue;
      parts.push(other.evictionS ? `${(other.evictionS.median / sgm.evictionS.median).toFixed(1)}x sooner than ${name}` : `(${name} did not finish)`);
    }
    parts.push(`at ${sgm.evictionOverBound!.toFixed(1)}x the source-link bound`);
    const post = get("postcopy");
    if (post?.totalS && sgm.totalS) parts.push(`with total time ${(sgm.totalS.median / post.totalS.median).toFixed(2)}x post-copy's`);
    out.push(`${parts.join(", ")}.`);
  }
  return out;
}

/** Eviction and total time per method and VM count, medians with min–max bars, as PNG. */
export async function renderChart(summaries: Summary[], title: string): Promise<Uint8Array> {
  const order = [...new Set(summaries.map((s) => s.label))];
  const values = summaries.flatMap((s) =>
    (
      [
        ["eviction", s.evictionS],
        ["total", s.totalS],
      ] as const
    )
      .filter(([, v]) => v !== null)
      .map(([figure, v]) => ({ vms: `${s.vms} VM${s.vms > 1 ? "s" : ""}`, method: s.label, order: order.indexOf(s.label), figure, median: v!.median, min: v!.min, max: v!.max })),
  );
  const x = { field: "method", type: "nominal", sort: { field: "order", op: "min" }, title: null, axis: { labelAngle: -35, labelLimit: 240 } } as const;
  const spec: vl.TopLevelSpec = {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title,
    data: { values },
    facet: { column: { field: "vms", type: "nominal", title: null } },
    spec: {
      width: { step: 22 },
      height: 220,
      layer: [
        {
          mark: "bar",
          encoding: {
            x,
            xOffset: { field: "figure" },
            y: { field: "median", type: "quantitative", title: "seconds (median; bars: min–max)" },
            color: { field: "figure", type: "nominal", title: null },
          },
        },
        {
          mark: { type: "rule", color: "black" },
          encoding: { x, xOffset: { field: "figure" }, y: { field: "min", type: "quantitative" }, y2: { field: "max" } },
        },
      ],
    },
    // each VM count shows only the methods it ran
    resolve: { scale: { x: "independent" } },
    config: { background: "white" },
  };
  // Vega-Lite warns that the facets' independent x scales share one field: they do, on purpose
  const view = new vega.View(vega.parse(vl.compile(spec, { logger: vega.logger(vega.Error) }).spec), { renderer: "none" });
  const svg = await view.toSVG();
  view.finalize();
  return new Resvg(svg, { font: { loadSystemFonts: true } }).render().asPng();
}
