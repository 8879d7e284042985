// Loaded before the test files (bunfig.toml). bun test fires no "exit"
// event, so what must go when the test process ends goes after the tests.

import { afterAll } from "bun:test";
import { removeSgmScratch } from "./sgm.ts";

afterAll(removeSgmScratch);
