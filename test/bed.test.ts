// The bed the benchmarks run on (test/harness/bed.ts): hosts in their own
// network namespaces, links held to their rates, nothing left behind.

import { afterAll, describe, expect, test } from "bun:test";
import { createBed, removeLeftoverBeds } from "./harness/bed.ts";

const SINK = `
// bun -e: the arguments start at argv[1]
const [expected, host] = [Number(process.argv[1]), process.argv[2]];
let got = 0;
Bun.listen({ hostname: host, port: 7777, socket: { data(s, c) { got += c.length; if (got >= expected) s.write(new Uint8Array([1])); } } });
console.log("ready");
`;
const SEND = `
const [bytes, host] = [Number(process.argv[1]), process.argv[2]];
const chunk = new Uint8Array(256 * 1024);
let sent = 0;
const done = Promise.withResolvers();
const pump = (s) => { while (sent < bytes) { const n = s.write(chunk.subarray(0, Math.min(chunk.length, bytes - sent))); sent += Math.max(n, 0); if (n < chunk.length) return; } };
const t0 = performance.now();
await Bun.connect({ hostname: host, port: 7777, socket: { open: pump, drain: pump, data: () => done.resolve() } });
await done.promise;
console.log(Math.round(performance.now() - t0));
process.exit(0);
`;

afterAll(() => removeLeftoverBeds());

describe("bed of hosts", () => {
  test("a host's egress is held to its rate, and the bed leaves no namespace behind", async () => {
    const bed = createBed([{ name: "src", egress: "40mbit" }, { name: "dst" }]);
    const names = [...bed.hosts.values()].map((h) => h.ns);
    try {
      const dst = bed.hosts.get("dst")!;
      const bytes = 4 * 1024 * 1024;
      const sink = Bun.spawn(bed.exec("dst", [process.execPath, "-e", SINK, String(bytes), dst.address]), { stdout: "pipe", stderr: "inherit" });
      const reader = sink.stdout.getReader();
      const first = await reader.read();
      expect(new TextDecoder().decode(first.value)).toContain("ready");
      const send = Bun.spawnSync(bed.exec("src", [process.execPath, "-e", SEND, String(bytes), dst.address]), { timeout: 30_000 });
      sink.kill();
      expect(send.exitCode).toBe(0);
      // 4 MiB at 40 Mbit/s takes 0.84 s; the 256 KiB burst takes off at most 0.05 s
      expect(Number(send.stdout.toString().trim())).toBeGreaterThan(700);
    } finally {
      bed.destroy();
    }
    const left = Bun.spawnSync(["ip", "netns", "list"]).stdout.toString();
    for (const ns of names) expect(left).not.toContain(ns);
  }, 60_000);

  test("the namespaces of a bed whose process is gone are removed by the next", () => {
    // pid 2^22 + 1 is above Linux's pid_max: never a live process
    const dead = 4194305;
    const stale = createBed([{ name: "a" }], { owner: dead });
    const ns = stale.hosts.get("a")!.ns;
    expect(removeLeftoverBeds()).toContain(ns);
    expect(Bun.spawnSync(["ip", "netns", "list"]).stdout.toString()).not.toContain(ns);
  });
});
