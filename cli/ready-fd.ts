// --ready-fd: a service says it listens by writing one line to a file
// descriptor its starter holds open (systemd's and scripts' way of waiting
// without parsing logs or polling a port), then closes it.

import { closeSync, fstatSync, writeSync } from "node:fs";
import { SgmError } from "../core/errors.ts";
import { parseCount } from "./args.ts";

/** The --ready-fd flag, checked before listening so that a wrong fd fails the command before it takes the port. */
export function parseReadyFd(flag: unknown): number | undefined {
  if (flag === undefined) return undefined;
  const fd = parseCount("--ready-fd", flag, 3, 65535);
  try {
    fstatSync(fd);
  } catch (err) {
    throw fdError(fd, err);
  }
  return fd;
}

/** Writes 'ready HOST:PORT' and closes the fd, so a script reading it to its end is not left waiting. */
export function announceReady(fd: number, address: string): void {
  try {
    writeSync(fd, `ready ${address}\n`);
    closeSync(fd);
  } catch (err) {
    throw fdError(fd, err);
  }
}

function fdError(fd: number, err: unknown): SgmError {
  const code = (err as NodeJS.ErrnoException).code;
  const why = code === "EBADF" ? "not an open file descriptor" : code === "EPIPE" ? "nobody reads it" : (err as Error).message;
  return new SgmError("usage", `--ready-fd ${fd}: ${why}`, { cause: err });
}
