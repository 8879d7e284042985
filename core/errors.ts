// One error type for the whole tool. Its kind decides the process exit code,
// so scripts can tell bad usage from an unreachable peer from bad data.

export type ErrorKind = "usage" | "data" | "unavailable" | "unconverged" | "insufficient" | "partial" | "internal" | "interrupted";

export const EXIT_CODES: Readonly<Record<ErrorKind, number>> = {
  partial: 3, // some VMs evicted, every other one still running at the source (no error is thrown with it)
  usage: 2, // bad flags or arguments (sysexits EX_USAGE is 64; 2 is what shells expect)
  data: 65, // malformed input: a stream, a frame, a file (EX_DATAERR)
  unavailable: 69, // a peer or QEMU is unreachable, refused, or went away (EX_UNAVAILABLE)
  unconverged: 75, // precopy did not converge within its bound; the VM runs on at the source (EX_TEMPFAIL)
  insufficient: 78, // the relays named cannot hold what will not go direct, or a relay's host its --prealloc capacity; nothing moved (EX_CONFIG)
  internal: 70, // a bug in sgm (EX_SOFTWARE)
  interrupted: 130, // SIGINT/SIGTERM (128 + 2)
};

export class SgmError extends Error {
  readonly kind: ErrorKind;

  constructor(kind: ErrorKind, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.kind = kind;
    this.name = "SgmError";
  }

  get exitCode(): number {
    return EXIT_CODES[this.kind];
  }
}

/** Any thrown value as an SgmError; unknown errors are internal bugs. */
export function asSgmError(err: unknown): SgmError {
  if (err instanceof SgmError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new SgmError("internal", message, { cause: err });
}
