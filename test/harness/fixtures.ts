// Builds and fetches into .cache/ what the test files need before any of
// them runs: make test runs the files two at a time, and two processes
// fetching QEMU 10.0 or the Linux guest at once would each replace the
// other's copy, under QEMUs started from it. Each is kept once there.
//   bun test/harness/fixtures.ts

import { buildGuest } from "./guest.ts";
import { linuxGuest } from "./linux-guest.ts";
import { qemu10_0 } from "./qemu-binaries.ts";

const started = performance.now();
await buildGuest();
await qemu10_0();
await linuxGuest();
console.log(`test fixtures ready in .cache/ (test guest, QEMU 10.0, Linux guest) after ${((performance.now() - started) / 1000).toFixed(1)} s`);
