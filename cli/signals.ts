// How sgm ends on a signal. SIGINT, and SIGTERM for most roles, abort the
// running role, which undoes what it can (a source VM keeps running) and
// exits 130. A role that can finish its work first (a relay draining its
// runs) takes the first SIGTERM instead; a second signal aborts it.

import { SgmError } from "../core/errors.ts";

export class Signals {
  private readonly abort = new AbortController();
  private onTerm: (() => void) | null = null;

  constructor() {
    const stop = (signal: NodeJS.Signals) => this.abort.abort(new SgmError("interrupted", `interrupted by ${signal}`));
    process.on("SIGINT", stop);
    process.on("SIGTERM", () => {
      const handler = this.onTerm;
      this.onTerm = null;
      if (handler) handler();
      else stop("SIGTERM");
    });
  }

  /** Aborted by SIGINT, by SIGTERM when no role took it, and by any signal after that. */
  get stop(): AbortSignal {
    return this.abort.signal;
  }

  /** The first SIGTERM calls `handler` instead of aborting. */
  takeFirstTerm(handler: () => void): void {
    this.onTerm = handler;
  }
}
