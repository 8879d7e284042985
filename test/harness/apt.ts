// Debian packages the tests need but do not install (QEMU 10.0, the Linux
// guest's kernel and busybox): fetched with apt-get download through a
// private sources list and lists folder, and unpacked with dpkg -x.

import { mkdirSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";

export class PrivateApt {
  private readonly work: string;
  private readonly options: string[];
  private readonly what: string;

  /** `work`: a folder of its own; `sources`: sources.list lines; `what`: for error messages. */
  constructor(work: string, sources: string[], what: string) {
    this.work = work;
    this.what = what;
    rmSync(work, { recursive: true, force: true });
    mkdirSync(join(work, "lists/partial"), { recursive: true });
    mkdirSync(join(work, "debs"));
    writeFileSync(join(work, "sources.list"), `${sources.join("\n")}\n`);
    this.options = [
      "-q",
      "-o", `Dir::Etc::SourceList=${join(work, "sources.list")}`,
      "-o", "Dir::Etc::SourceParts=/dev/null",
      "-o", `Dir::State::Lists=${join(work, "lists")}`,
    ];
  }

  update(): Promise<string> {
    return this.run(["apt-get", ...this.options, "update"], this.work);
  }

  /** The package names `depends` lists for a package (apt-cache depends output). */
  depends(pkg: string): Promise<string> {
    return this.run(["apt-cache", ...this.options, "depends", pkg], this.work);
  }

  /** Downloads the packages and unpacks them all into `into`. */
  async downloadAndUnpack(packages: string[], into: string): Promise<void> {
    const debs = join(this.work, "debs");
    await this.run(["apt-get", ...this.options, "download", ...packages], debs);
    for (const deb of readdirSync(debs)) await this.run(["dpkg", "-x", join(debs, deb), into], this.work);
  }

  private async run(cmd: string[], cwd: string): Promise<string> {
    const proc = Bun.spawn(cmd, { cwd, stdout: "pipe", stderr: "pipe" });
    const [code, out, err] = await Promise.all([proc.exited, new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
    if (code !== 0) throw new Error(`${cmd.slice(0, 2).join(" ")} failed (${code}) while fetching ${this.what}:\n${err}`);
    return out;
  }
}
