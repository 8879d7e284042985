// The progress a person sees, through the compiled binary: under a
// pseudo-terminal (script(1)) scatter draws its VMs in place, phase by
// phase, and leaves the terminal clean; into a pipe the gather prints plain
// timestamped lines without escape codes; --quiet prints nothing.

import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { haltAndCompare, startGather, startPair, startScatter, writePsk } from "./harness/cluster.ts";
import { killAll, track } from "./harness/processes.ts";
import { expectExit, sgmBinary, sgmEnv } from "./harness/sgm.ts";
import { freePort, makeTempDir, removeDir } from "./harness/tmp.ts";

let dir: string;
let psk: string;

beforeAll(async () => {
  dir = makeTempDir("progress");
  psk = await writePsk(dir);
});
afterEach(async () => {
  await killAll();
});
afterAll(() => removeDir(dir));

const ESC = "\x1b[";

/** A command line for sh -c, each argument quoted. */
function shellLine(args: string[]): string {
  return args.map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(" ");
}

describe("progress", () => {
  test("on a terminal scatter redraws each VM's phase in place and ends cleanly; into a pipe the gather prints plain timestamped lines", async () => {
    const pair = await startPair(dir, "tty", { memMiB: 128, seed: 301, rate: 2000 });
    // held to 16 MiB/s, the gather takes several seconds: long enough for its plain lines
    const { gather, port } = await startGather([pair], psk, ["--max-rate", "16MiB/s"]);
    const scatterArgs = [await sgmBinary(), "scatter", "--to", `127.0.0.1:${port}`, "--vm", `tty=${pair.source.qmpPath}`, "--psk-file", psk, "--keep-source"];
    // script gives scatter a pseudo-terminal for stdin, stdout and stderr, and copies what it shows to our stdout
    const scatter = track(Bun.spawn(["script", "-qfec", shellLine(scatterArgs), "/dev/null"], { stdout: "pipe", stderr: "pipe", stdin: "ignore", env: sgmEnv({ TERM: "xterm" }) }));
    const [code, screen] = await Promise.all([scatter.exited, new Response(scatter.stdout).text()]);
    const g = await gather.result();
    if (code !== 0) throw new Error(`scatter exited ${code}; its terminal showed, at the end:\n${screen.slice(-3000)}\ngather's stderr, at the end:\n${g.stderr.slice(-2000)}`);
    expectExit(g, 0);

    // drawn in place: lines erased and redrawn, the phases in their order, the cursor shown again at the end
    expect(screen).toContain(`${ESC}2K`);
    const phases = ["precopy pass 1", "evicted", "done"].map((p) => screen.indexOf(`tty: ${p}`));
    for (const at of phases) expect(at).toBeGreaterThanOrEqual(0);
    expect([...phases].sort((a, b) => a - b)).toEqual(phases);
    expect(screen).toMatch(/tty: precopy pass 1, [\d.]+ \w?i?B of 12\d(\.\d)? MiB scattered/);
    expect(screen.lastIndexOf(`${ESC}?25h`)).toBeGreaterThan(screen.lastIndexOf("tty: done"));
    // the log lines still print, above the display
    expect(screen).toContain("evicted in");

    // the gather's stderr is a pipe: plain lines, every few seconds, no escape codes
    expect(g.stderr).not.toContain("\x1b");
    expect(g.stderr).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ sgm: tty: (gathering|switchover|running), [\d.]+ \w?i?B of 12\d(\.\d)? MiB gathered/m);

    const { verified, comparison } = await haltAndCompare(pair, dir);
    expect(verified).toBe(true);
    expect(comparison.mismatched).toEqual([]);
  }, 180_000);

  test("colour on a terminal, none with NO_COLOR", async () => {
    // a usage error prints one coloured line at once: no QEMU needed
    const line = shellLine([await sgmBinary(), "scatter", "--to", "nohost", "--vm", "a=/x.qmp", "--psk-file", psk]);
    const onTerminal = async (env: Record<string, string>) => {
      const proc = track(Bun.spawn(["script", "-qfec", line, "/dev/null"], { stdout: "pipe", stdin: "ignore", env }));
      const [code, screen] = await Promise.all([proc.exited, new Response(proc.stdout).text()]);
      expect(code).toBe(2);
      expect(screen).toContain("sgm: error:");
      return screen;
    };
    const { NO_COLOR: _, ...withColour } = process.env as Record<string, string>;
    expect(await onTerminal(withColour)).toContain(`${ESC}31m`);
    expect(await onTerminal({ ...withColour, NO_COLOR: "1" })).not.toContain(ESC);
  });

  test("--quiet: scatter and gather print nothing on stderr, the gather says it listens on --ready-fd, and the VM arrives", async () => {
    const pair = await startPair(dir, "quiet", { memMiB: 64, seed: 302, rate: 1000 });
    const port = await freePort();
    const args = ["gather", "--listen", `127.0.0.1:${port}`, "--vm", `quiet=${pair.destination.qmpPath}`, "--psk-file", psk, "--json", "--quiet", "--ready-fd", "3"];
    const proc = track(Bun.spawn([await sgmBinary(), ...args], { stdio: ["ignore", "pipe", "pipe", "pipe"], env: sgmEnv() }));
    // the one line, then the descriptor closes: read to its end
    const ready = await Bun.file(proc.stdio[3] as number).text();
    expect(ready).toBe(`ready 127.0.0.1:${port}\n`);
    const gather = {
      result: async () => {
        const [code, stdout, stderr] = await Promise.all([proc.exited, new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
        return { code, stdout, stderr, args };
      },
    };
    const scatter = await startScatter([pair], port, psk, ["--keep-source", "--quiet"]);
    const [s, g] = await Promise.all([scatter.result(), gather.result()]);
    expectExit(s, 0);
    expectExit(g, 0);
    expect(s.stderr).toBe("");
    expect(g.stderr).toBe("");
    expect(JSON.parse(s.stdout).vms[0].ok).toBe(true);
    const { verified, comparison } = await haltAndCompare(pair, dir);
    expect(verified).toBe(true);
    expect(comparison.mismatched).toEqual([]);
  }, 180_000);
});
