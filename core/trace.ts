// Timestamped milestones on stderr when SGM_TRACE is set: where the time of
// an eviction goes, across processes (wall clock, so lines from scatter and
// gather on one host sort together).

const enabled = Boolean(process.env.SGM_TRACE);

export function trace(what: string): void {
  if (enabled) process.stderr.write(`sgm-trace ${Date.now()} ${process.pid} ${what}\n`);
}
