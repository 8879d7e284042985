// How a gather that is done leaves its scatter: it reads on until the
// scatter closes its side, for a bounded time, before it returns (and its
// process exits). A process that exits with a peer's bytes unread makes its kernel
// send a reset, which can take the gather's last words from the scatter
// before it read them: the scatter then fails a VM the gather took.
// A scripted scatter replays a recorded session, so the gather's side is
// all that runs.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type GatherReport, runGather } from "../core/gather/engine.ts";
import { HANG_UP_WAIT_MS } from "../core/gather/scatter-session.ts";
import { eventually, rawSession, type RawSession } from "./harness/fuzz.ts";
import { ModelDestinationQemu } from "./harness/model/destination-qemu.ts";
import { recordScatterFrames } from "./harness/model/eviction.ts";
import { within } from "./harness/within.ts";
import type { SourceScript } from "./harness/model/source-qemu.ts";

const psk = new TextEncoder().encode("hang up key 0123456789abcdef");
const dir = mkdtempSync(join(tmpdir(), "sgm-hangup-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const script: SourceScript = { blocks: [{ name: "pc.ram", pages: 256 }], initial: (i) => (i % 4 === 3 ? 0 : 1 + (i % 50)), writes: () => [], passes: 1 };
let recorded: Array<{ type: number; payload: Uint8Array }>;
beforeAll(async () => {
  recorded = await recordScatterFrames("hu", script);
});

/** Replays the recorded session to a gather; `prepare` shapes the scripted scatter first. */
async function replay(name: string, prepare: (session: RawSession) => void): Promise<{ session: RawSession; gathered: Promise<GatherReport>; destination: ModelDestinationQemu }> {
  const destination = new ModelDestinationQemu(dir, name, { blocks: script.blocks });
  const listening = Promise.withResolvers<number>();
  const gathered = runGather({
    listen: { host: "127.0.0.1", port: 0 },
    vms: [{ name: "hu", qmp: destination.qmpPath }],
    psk,
    stateDir: null,
    onListening: (port) => listening.resolve(port),
  });
  gathered.catch((err: Error) => listening.reject(err));
  const session = await rawSession(await listening.promise, psk, "scatter", 64 << 20);
  prepare(session);
  for (const f of recorded) session.writeFrame(f.type, f.payload);
  return { session, gathered, destination };
}

describe("a gather that is done hangs up on its scatter", () => {
  test("it reads on until the scatter closes its side, for a bounded time: a scatter that never closes holds it that long, no longer", async () => {
    // a scatter that reads nothing never sees the gather's end of stream, so never closes
    const { session, gathered, destination } = await replay("hu-stuck", (s) => s.pause());
    try {
      await eventually(() => destination.migrationStatus === "completed", 60_000, "the destination did not complete its migration");
      const completedAt = performance.now();
      const report = await within(gathered, 30_000 + HANG_UP_WAIT_MS, "the gather, its scatter reading nothing, did not end");
      const waited = performance.now() - completedAt;
      expect(report.ok).toBe(true);
      // its VM was done as its destination completed: what it waited after that was for the scatter
      expect(waited, "the gather returned without waiting for its scatter to close").toBeGreaterThan(HANG_UP_WAIT_MS - 500);
    } finally {
      session.close();
      destination.close();
    }
  }, 120_000);
});
