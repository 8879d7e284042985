// The words for a socket failing, shared by connecting and by every
// connection's socket events: errno codes become what a user can act on.

import { asSgmError, SgmError } from "../errors.ts";

/** An error in what a peer sent (kind data), tied to the peer's address once. */
export function peerError(address: string, err: unknown): SgmError {
  const error = asSgmError(err);
  if (error.kind !== "data" || error.message.startsWith(`${address}:`)) return error;
  return new SgmError("data", `${address}: ${error.message}`, { cause: error });
}

export function connectError(address: string, err: unknown): SgmError {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  const why =
    code === "ECONNREFUSED"
      ? "connection refused"
      : code === "ENOTFOUND" || code === "EAI_AGAIN"
        ? "cannot resolve host name"
        : code === "ETIMEDOUT"
          ? "connection timed out"
          : code === "EHOSTUNREACH" || code === "ENETUNREACH"
            ? "host unreachable"
            : err instanceof Error
              ? err.message
              : String(err);
  return new SgmError("unavailable", `${address}: ${why}`, { cause: err });
}

/** A certificate refused, by its OpenSSL code when there is one (CERT_HAS_EXPIRED, DEPTH_ZERO_SELF_SIGNED_CERT, ...). */
export function tlsReason(err: Error): string {
  const code = (err as NodeJS.ErrnoException).code;
  return code ? `${code} (${err.message})` : err.message;
}

export function socketError(address: string, err: Error): SgmError {
  const code = (err as NodeJS.ErrnoException).code;
  const why = code === "ECONNRESET" ? "connection reset by peer" : code === "EPIPE" ? "connection closed by peer" : err.message;
  return new SgmError("unavailable", `${address}: ${why}`, { cause: err });
}
