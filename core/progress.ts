// Where each VM of a run stands, as scatter and gather report it while they
// work: a snapshot the CLI draws, on a terminal or as plain lines.

/**
 * queued: waiting for its turn (evacuate --max-in-flight). checking: offered, not streaming yet. precopy: the source's passes
 * (scatter) or pages fed to the destination before switchover (gather,
 * "gathering"). switchover: the source has stopped; the rest is on its way.
 * scattering: the VM runs at the destination while a postcopy source still
 * sends. evicted: every page is off the source. running: the destination
 * runs the VM (and the gather still delivers). done, failed: over.
 */
export type Phase = "queued" | "checking" | "precopy" | "switchover" | "scattering" | "evicted" | "gathering" | "running" | "done" | "failed";

export interface VmProgress {
  name: string;
  phase: Phase;
  /** The source's precopy pass (scatter), 0 before the first. */
  pass: number;
  /** What this role has moved for the VM: read from the source (scatter), written to the destination QEMU (gather). */
  bytes: number;
  /** The VM's memory, once known. */
  totalBytes: number | null;
}

export type ProgressSource = () => VmProgress[];
