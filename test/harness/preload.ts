// Loaded before the test files (bunfig.toml). bun test fires no "exit"
// event, so what must go when the test process ends goes after the tests.

import { afterAll } from "bun:test";
import { killAll } from "./processes.ts";
import { removeSgmScratch } from "./sgm.ts";

// a test that fails before it stops what it started would leave it running
afterAll(async () => {
  await killAll();
  removeSgmScratch();
});
