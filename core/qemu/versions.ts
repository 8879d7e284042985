// Which QEMU versions sgm carries. The stream changes between versions
// (../shared/qemu-migration-protocol.md lists where), so sgm refuses what it
// has not been built and tested against rather than guess.

import { SgmError } from "../errors.ts";
import type { QmpClient, QmpVersion } from "../qmp/client.ts";

/** Tested against 7.2 and 10.0; 8.x and 9.x read from QEMU's source. */
export const OLDEST = { major: 7, minor: 2 };
export const NEWEST_MAJOR = 10;

export function versionString(v: QmpVersion): string {
  return `${v.major}.${v.minor}.${v.micro}`;
}

/** QEMU takes avail-switchover-bandwidth, the rate its switchover decision assumes (since 8.2). */
export function hasSwitchoverBandwidth(v: QmpVersion): boolean {
  return v.major > 8 || (v.major === 8 && v.minor >= 2);
}

/** Throws a usage error naming the VM and version if sgm cannot carry it. */
export function checkSupported(v: QmpVersion, what: string): void {
  const older = v.major < OLDEST.major || (v.major === OLDEST.major && v.minor < OLDEST.minor);
  if (older) {
    throw new SgmError("usage", `${what} runs QEMU ${versionString(v)}, older than sgm carries (${OLDEST.major}.${OLDEST.minor} and later)`);
  }
  if (v.major > NEWEST_MAJOR) {
    throw new SgmError("usage", `${what} runs QEMU ${versionString(v)}, newer than sgm knows (up to ${NEWEST_MAJOR}.x)`);
  }
}

/** The machine type QEMU runs, e.g. "pc-i440fx-7.2" (the alias "pc" resolved). */
export async function machineType(qmp: QmpClient): Promise<string> {
  const type = await qmp.execute<string>("qom-get", { path: "/machine", property: "type" });
  return type.replace(/-machine$/, "");
}
