// The compiled executable's command line: help, version, and usage errors.

import { describe, expect, test } from "bun:test";
import { WIRE_VERSION } from "../core/wire/frames.ts";
import { expectExit, runSgm } from "./harness/sgm.ts";

describe("dist/sgm", () => {
  test("--help lists the three roles, evacuate and check", async () => {
    const r = await runSgm(["--help"]);
    expectExit(r, 0);
    for (const role of ["scatter", "relay", "gather", "evacuate", "check"]) expect(r.stdout).toMatch(new RegExp(`^\\s+${role}\\s+\\S`, "m"));
  });

  test.each([
    ["scatter", ["--to", "--vm", "--via", "--replicas", "--psk-file", "--keep-source", "--plan", "--source-rate", "--all-relays", "--allow-shortfall", "--digest-threads", "--quiet", "--json"]],
    ["relay", ["--listen", "--capacity", "--psk-file", "--max-rate", "--digest-threads"]],
    ["gather", ["--listen", "--vm", "--psk-file", "--digest-threads", "--quiet", "--json"]],
    ["evacuate", ["--map", "--to", "--vm", "--qmp-dir", "--max-in-flight", "--via", "--via-file", "--psk-file", "--switchover", "--keep-source", "--quiet", "--json"]],
    ["check", ["--to", "--vm", "--via", "--via-file", "--replicas", "--source-rate", "--all-relays", "--psk-file", "--json"]],
  ])("%s --help shows its own flags", async (role, flags) => {
    const r = await runSgm([role, "--help"]);
    expectExit(r, 0);
    expect(r.stdout).toContain(`$ sgm ${role} `);
    for (const flag of flags) expect(r.stdout).toContain(flag);
  });

  test("--version prints the version baked in at build time, and the wire protocol", async () => {
    const pkg = (await Bun.file(`${import.meta.dir}/../package.json`).json()) as { version: string };
    const r = await runSgm(["--version"]);
    expectExit(r, 0);
    expect(r.stdout).toMatch(new RegExp(`^sgm ${pkg.version.replace(/\./g, "\\.")}\\+[0-9a-f]+ \\(wire protocol ${WIRE_VERSION}\\)\\n$`));
  });

  test("an unknown command is a usage error (exit 2) on one line", async () => {
    const r = await runSgm(["evict"]);
    expectExit(r, 2);
    expect(r.stdout).toBe("");
    expect(r.stderr).toBe("sgm: error: unknown command 'evict' (try sgm --help)\n");
  });

  test("an unknown flag is a usage error (exit 2)", async () => {
    const r = await runSgm(["relay", "--frobnicate"]);
    expectExit(r, 2);
    expect(r.stderr).toBe("sgm: error: Unknown option `--frobnicate`\n");
  });

  test.each([
    [["scatter", "--vm", "a=/x.qmp", "--psk-file", "/k"], "--to is required"],
    [["scatter", "--to", "nohost", "--vm", "a=/x.qmp", "--psk-file", "/k"], "--to 'nohost': expected HOST:PORT"],
    [["scatter", "--to", "h:1", "--psk-file", "/k"], "--vm NAME=QMP_SOCKET is required"],
    [["scatter", "--to", "h:1", "--vm", "noequals", "--psk-file", "/k"], "--vm 'noequals': expected NAME=QMP_SOCKET (NAME: letters, digits, . _ -)"],
    [["scatter", "--to", "h:1", "--vm", "a=/x", "--vm", "a=/y", "--psk-file", "/k"], "--vm: 'a' is given twice"],
    [["scatter", "--to", "h:1", "--vm", "a=/x", "--psk-file", "/nonexistent/psk"], "--psk-file '/nonexistent/psk': "],
    [["scatter", "--to", "h:1", "--vm", "a=/x", "--psk-file", "/k", "--max-passes", "5"], "--max-passes needs --switchover precopy"],
    [["scatter", "--to", "h:1", "--vm", "a=/x", "--psk-file", "/k", "--switchover", "precopy", "--max-passes", "0"], "--max-passes '0': expected a whole number from 1 to 10000"],
    [["scatter", "--to", "h:1", "--vm", "a=/x", "--psk-file", "/k", "--via-file", "/nonexistent/relays"], "--via-file '/nonexistent/relays': cannot read it (ENOENT)"],
    [["scatter", "--to", "h:1", "--vm", "a=/x", "--psk-file", "/k", "--via-file", `${import.meta.dir}/cli.test.ts`], `--via-file ${import.meta.dir}/cli.test.ts line 1: `],
    [["scatter", "--to", "h:1", "--vm", "a=/x", "--psk-file", "/k", "--source-rate", "quick"], "--source-rate 'quick': expected a size such as 8GiB or 512MiB"],
    [["scatter", "--to", "h:1", "--vm", "a=/x", "--psk-file", "/k", "--digest-threads", "many"], "--digest-threads 'many': expected a whole number from 0 to 64"],
    [["relay", "--listen", "127.0.0.1:0", "--capacity", "1GiB", "--psk-file", "/k", "--max-rate", "0"], "--max-rate '0': must be more than zero"],
    [["gather", "--listen", "127.0.0.1:0", "--vm", "a=/x", "--psk-file", "/k", "--state-dir", "none", "--digest-threads", "65"], "--digest-threads '65': expected a whole number from 0 to 64"],
    [["check", "--vm", "a=/x.qmp", "--psk-file", "/k"], "--to is required"],
    [["evacuate", "--psk-file", "/k"], "name the VMs: --map FILE, or --vm NAME=QMP_SOCKET and/or --qmp-dir DIR with --to HOST:PORT"],
    [["evacuate", "--vm", "a=/x.qmp", "--psk-file", "/k"], "--to is required"],
    [["evacuate", "--map", "/m", "--to", "h:1", "--psk-file", "/k"], "--map names every VM and its gather: not with --vm, --qmp-dir or --to"],
    [["evacuate", "--map", "/nonexistent/map", "--psk-file", "/k"], "--map '/nonexistent/map': cannot read it (ENOENT)"],
    [["evacuate", "--map", `${import.meta.dir}/cli.test.ts`, "--psk-file", "/k"], `--map ${import.meta.dir}/cli.test.ts line 1: `],
    [["evacuate", "--qmp-dir", "/nonexistent/run", "--to", "h:1", "--psk-file", "/k"], "--qmp-dir '/nonexistent/run': cannot read it (ENOENT)"],
    [["evacuate", "--qmp-dir", import.meta.dir, "--to", "h:1", "--psk-file", "/k"], `--qmp-dir '${import.meta.dir}': no QMP sockets in it`],
    [["evacuate", "--vm", "a=/x", "--to", "h:1", "--psk-file", "/k", "--max-in-flight", "0"], "--max-in-flight '0': expected a whole number from 1 to 10000"],
    [["evacuate", "--vm", "a=/x", "--to", "h:1", "--psk-file", "/k", "--max-passes", "3"], "--max-passes needs --switchover precopy"],
    [["gather", "--listen", "127.0.0.1:0", "--psk-file", "/k"], "--vm NAME=QMP_SOCKET is required"],
    [["gather", "--listen", "127.0.0.1:0", "--vm", "a=/x", "--psk-file", "/k", "--postcopy-bandwidth", "fast"], "--postcopy-bandwidth 'fast': expected a size such as 8GiB or 512MiB"],
    [["gather", "--listen", "127.0.0.1:0", "--vm", "a=/x", "--psk-file", "/k", "--resume", "--state-dir", "none"], "--resume needs the --state-dir the gather before it saved to, not 'none'"],
  ])("usage error %j", async (args, message) => {
    const r = await runSgm(args);
    expectExit(r, 2);
    expect(r.stdout).toBe("");
    expect(r.stderr.startsWith(`sgm: error: ${message}`)).toBe(true);
    expect(r.stderr.split("\n").length).toBe(2); // one line
  });
});
