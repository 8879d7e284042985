// One VM's saved state for --resume, as the gather feeding it keeps it:
// taken at one instant, written beside delivery, removed once it can serve
// no resume (the migration completed, a wrong page, a new migration to the
// same QEMU). `saved` tells when the write is over, as the scatter may quit
// the source only then.

import { rmSync } from "node:fs";
import { formatBytes } from "../units.ts";
import type { FeedSnapshot } from "./feed-state.ts";
import { saveResumeState } from "./resume-state.ts";

export class StateKeeper {
  /** Resolves once the last save is written, or could not be. */
  saved: Promise<void> = Promise.resolve();
  private readonly path: string | null;
  private readonly name: string;
  private readonly log: (line: string) => void;

  /** `path` null: nothing is saved. */
  constructor(path: string | null, name: string, log: (line: string) => void) {
    this.path = path;
    this.name = name;
    this.log = log;
  }

  /** Takes the state now (`take`, synchronous) and writes it in the background, then lets go of what it held. */
  save(take: () => FeedSnapshot): void {
    const path = this.path;
    if (path === null) return;
    const started = performance.now();
    const cannot = (err: unknown) => {
      this.forget();
      this.log(`VM ${this.name}: could not save its state for --resume (${(err as Error).message}); if this gather dies before the migration completes, the VM is lost`);
    };
    let snapshot: FeedSnapshot;
    try {
      snapshot = take();
    } catch (err) {
      cannot(err);
      return;
    }
    const taken = performance.now() - started;
    this.saved = saveResumeState(path, snapshot.state)
      .finally(snapshot.release)
      .then(
        (bytes) => this.log(`${this.name}: state for --resume saved to ${path} (${formatBytes(bytes)}; taken in ${Math.round(taken)} ms, written in ${Math.round(performance.now() - started - taken)} ms)`),
        cannot,
      );
  }

  /** Removes the saved state, once any write of it is over. */
  forget(): void {
    const path = this.path;
    if (path) void this.saved.then(() => rmSync(path, { force: true }));
  }
}
