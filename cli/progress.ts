// Progress a person can follow. On a terminal: one line per VM, redrawn in
// place (log-update) with its phase, bytes, rate and ETA; the log lines
// print above it. Otherwise (a pipe, a file, cron): plain timestamped lines
// at a steady pace. --quiet: neither.

import kleur from "kleur";
import type { createLogUpdate } from "log-update";
import type { ProgressSource, VmProgress } from "../core/progress.ts";
import { formatBytes, formatRate } from "../core/units.ts";
import { setLineWriter } from "./output.ts";

const REDRAW_MS = 250;
const PLAIN_EVERY_MS = 5000;
/** The rate is what moved over this window, so a pause shows soon and a burst does not linger. */
const RATE_WINDOW_MS = 3000;

interface ProgressOptions {
  /** What each VM is moving: "scattered" or "gathered". */
  verb: string;
  quiet: boolean;
  /** Draw in place (stderr is a terminal) or print plain lines. */
  live: boolean;
}

interface ProgressDisplay {
  /** The run has begun: from here on, VMs are shown. */
  start(source: ProgressSource): void;
  /** Draws the last state and leaves the terminal as it was. */
  stop(): void;
}

async function progressDisplay(options: ProgressOptions): Promise<ProgressDisplay> {
  if (options.quiet) return { start() {}, stop() {} };
  // log-update and what it loads, only on a terminal: no other run pays for loading them
  const surface = options.live ? new TerminalSurface((await import("log-update")).createLogUpdate) : new PlainSurface();
  return new PolledDisplay(options.verb, surface);
}

/**
 * Runs a role's work with a display of what it reports (drawn in place when
 * stderr is a terminal), stopped however the work ends.
 */
export async function withProgress<R>(verb: string, quiet: boolean, work: (onProgress: (source: ProgressSource) => void) => Promise<R>): Promise<R> {
  const display = await progressDisplay({ verb, quiet, live: Boolean(process.stderr.isTTY) });
  try {
    return await work((source) => display.start(source));
  } finally {
    display.stop();
  }
}

/** Where the VMs' lines go, and how often. */
interface Surface {
  readonly everyMs: number;
  /** Before the first show(); `redraw` shows the latest state at once. */
  begin(redraw: () => void): void;
  show(vms: ReadonlyArray<{ vm: VmProgress; line: string }>): void;
  /** After the last show(). */
  end(): void;
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

/** Asks the run where each VM stands, every surface.everyMs, and shows it. */
class PolledDisplay implements ProgressDisplay {
  private readonly verb: string;
  private readonly surface: Surface;
  private readonly rates = new Rates();
  private source: ProgressSource | null = null;
  private timer: ReturnType<typeof setInterval> | null = null;

  constructor(verb: string, surface: Surface) {
    this.verb = verb;
    this.surface = surface;
  }

  start(source: ProgressSource): void {
    this.source = source;
    this.surface.begin(() => this.show());
    this.timer = setInterval(() => this.show(), this.surface.everyMs);
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    if (!this.source) return;
    this.surface.end();
    this.source = null;
  }

  private show(): void {
    if (!this.source) return;
    const now = performance.now();
    this.surface.show(this.source().map((vm) => ({ vm, line: describe(vm, this.rates.rate(vm, now), this.verb) })));
  }
}

/** A terminal: the lines redrawn in place, log lines printed above them. */
class TerminalSurface implements Surface {
  readonly everyMs = REDRAW_MS;
  private readonly draw: ReturnType<typeof createLogUpdate>;
  private redraw: () => void = () => {};

  constructor(create: typeof createLogUpdate) {
    this.draw = create(sizedStderr(), { showCursor: false });
  }

  begin(redraw: () => void): void {
    this.redraw = redraw;
    // a log line clears the block, prints, and the block is drawn again below it
    setLineWriter((text) => {
      this.draw.clear();
      process.stderr.write(text);
      redraw();
    });
    redraw();
  }

  show(vms: ReadonlyArray<{ vm: VmProgress; line: string }>): void {
    const colour = ({ vm, line }: { vm: VmProgress; line: string }) =>
      vm.phase === "failed" ? kleur.red(line) : vm.phase === "done" ? kleur.green(line) : line;
    this.draw(vms.map(colour).join("\n"));
  }

  end(): void {
    this.redraw();
    this.draw.done();
    setLineWriter(null);
  }
}

/** A pipe, a file, cron: a timestamped line per VM still under way, every few seconds. */
class PlainSurface implements Surface {
  readonly everyMs = PLAIN_EVERY_MS;

  begin(): void {}

  show(vms: ReadonlyArray<{ vm: VmProgress; line: string }>): void {
    const stamp = new Date().toISOString().replace(/\.\d+Z$/, "Z");
    for (const { vm, line } of vms) {
      if (vm.phase !== "done" && vm.phase !== "failed") process.stderr.write(`${stamp} sgm: ${line}\n`);
    }
  }

  end(): void {}
}
