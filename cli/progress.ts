// Progress a person can follow. On a terminal: one line per VM, redrawn in
// place (log-update) with its phase, bytes, rate and ETA; the log lines
// print above it. Otherwise (a pipe, a file, cron): plain timestamped lines
// at a steady pace. --quiet: neither.

import kleur from "kleur";
import { createLogUpdate } from "log-update";
import type { ProgressSource, VmProgress } from "../core/progress.ts";
import { formatBytes, formatRate } from "../core/units.ts";
import { setLineWriter } from "./output.ts";

const REDRAW_MS = 250;
const PLAIN_EVERY_MS = 5000;
/** The rate is what moved over this window, so a pause shows soon and a burst does not linger. */
const RATE_WINDOW_MS = 3000;

export interface ProgressOptions {
  /** What each VM is moving: "scattered" or "gathered". */
  verb: string;
  quiet: boolean;
  /** Draw in place (stderr is a terminal) or print plain lines. */
  live: boolean;
}

export interface ProgressDisplay {
  /** The run has begun: from here on, VMs are shown. */
  start(source: ProgressSource): void;
  /** Draws the last state and leaves the terminal as it was. */
  stop(): void;
}

export function progressDisplay(options: ProgressOptions): ProgressDisplay {
  if (options.quiet) return { start() {}, stop() {} };
  return options.live ? new LiveDisplay(options.verb) : new PlainDisplay(options.verb);
}

/** Bytes over time per VM, for rates. */
class Rates {
  private readonly samples = new Map<string, Array<{ at: number; bytes: number }>>();

  rate(vm: VmProgress, now: number): number | null {
    let list = this.samples.get(vm.name);
    if (!list) this.samples.set(vm.name, (list = []));
    list.push({ at: now, bytes: vm.bytes });
    while (list.length > 2 && now - list[1]!.at >= RATE_WINDOW_MS) list.shift();
    const first = list[0]!;
    const seconds = (now - first.at) / 1000;
    return seconds >= 0.5 ? (vm.bytes - first.bytes) / seconds : null;
  }
}

const ACTIVE = new Set(["precopy", "gathering", "switchover", "scattering", "running"]);

/** One VM's line: name, phase, bytes, rate, ETA (first pass or gathering only: later passes re-read memory). */
function describe(vm: VmProgress, rate: number | null, verb: string): string {
  const phase = vm.phase === "precopy" && vm.pass > 0 ? `precopy pass ${vm.pass}` : vm.phase;
  const parts = [`${vm.name}: ${phase}`];
  const of = vm.totalBytes === null ? "" : ` of ${formatBytes(vm.totalBytes)}`;
  if (vm.bytes > 0 || vm.totalBytes !== null) parts.push(`${formatBytes(vm.bytes)}${of} ${verb}`);
  if (rate !== null && ACTIVE.has(vm.phase)) {
    parts.push(formatRate(rate));
    const firstPass = vm.phase === "gathering" || (vm.phase === "precopy" && vm.pass <= 1);
    if (firstPass && vm.totalBytes !== null && rate > 0 && vm.bytes < vm.totalBytes) {
      parts.push(`ETA ${Math.ceil((vm.totalBytes - vm.bytes) / rate)} s`);
    }
  }
  return parts.join(", ");
}

/**
 * stderr as log-update sees it: a terminal that reports no size (0 x 0, as
 * script(1) gives one without a terminal of its own, or some serial
 * consoles) would have it draw nothing, so its size counts as 80 x 24.
 */
function sizedStderr(): NodeJS.WriteStream {
  const err = process.stderr;
  return Object.create(err, {
    columns: { get: () => err.columns || 80 },
    rows: { get: () => err.rows || 24 },
    write: { value: (text: string) => err.write(text) },
  }) as NodeJS.WriteStream;
}

class LiveDisplay implements ProgressDisplay {
  private readonly verb: string;
  private readonly rates = new Rates();
  private readonly draw = createLogUpdate(sizedStderr(), { showCursor: false });
  private source: ProgressSource | null = null;
  private timer: ReturnType<typeof setInterval> | null = null;

  constructor(verb: string) {
    this.verb = verb;
  }

  start(source: ProgressSource): void {
    this.source = source;
    // a log line clears the block, prints, and the block is drawn again below it
    setLineWriter((text) => {
      this.draw.clear();
      process.stderr.write(text);
      this.render();
    });
    this.render();
    this.timer = setInterval(() => this.render(), REDRAW_MS);
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    if (!this.source) return;
    this.render();
    this.draw.done();
    setLineWriter(null);
    this.source = null;
  }

  private render(): void {
    if (!this.source) return;
    const now = performance.now();
    const lines = this.source().map((vm) => {
      const line = describe(vm, this.rates.rate(vm, now), this.verb);
      if (vm.phase === "failed") return kleur.red(line);
      if (vm.phase === "done") return kleur.green(line);
      return line;
    });
    this.draw(lines.join("\n"));
  }
}

class PlainDisplay implements ProgressDisplay {
  private readonly verb: string;
  private readonly rates = new Rates();
  private source: ProgressSource | null = null;
  private timer: ReturnType<typeof setInterval> | null = null;

  constructor(verb: string) {
    this.verb = verb;
  }

  start(source: ProgressSource): void {
    this.source = source;
    this.timer = setInterval(() => this.print(), PLAIN_EVERY_MS);
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.source = null;
  }

  private print(): void {
    if (!this.source) return;
    const now = performance.now();
    const stamp = new Date().toISOString().replace(/\.\d+Z$/, "Z");
    for (const vm of this.source()) {
      if (vm.phase === "done" || vm.phase === "failed") continue;
      process.stderr.write(`${stamp} sgm: ${describe(vm, this.rates.rate(vm, now), this.verb)}\n`);
    }
  }
}
