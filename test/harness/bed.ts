// A bed of hosts on this machine, for benchmarks across real links: one
// network namespace per host, each joined by a veth pair to a switch
// namespace holding a bridge, so every byte between hosts crosses two
// shaped veths. Rates are tc tbf on each host's egress (its side of the
// pair) and ingress (the switch's side). Delay needs tc netem, which some
// kernels lack (this machine's has no modules for it): the bed says whether
// it applied one.
//
// Namespaces are named sgmbed-<pid>-<host>; a bed whose process is gone (a
// killed run) is removed by the next one.

const PREFIX = "sgmbed";

export interface HostSpec {
  name: string;
  /** tc rates such as "2gbit"; none means unshaped. */
  egress?: string;
  ingress?: string;
}

export interface BedHost {
  name: string;
  ns: string;
  address: string;
}

export interface Bed {
  readonly hosts: ReadonlyMap<string, BedHost>;
  /** Whether the one-way delay asked for is applied on every link. */
  readonly delayApplied: boolean;
  /** The command line that runs argv inside a host. */
  exec(host: string, argv: string[]): string[];
  /** Bytes a host has sent and received on its link so far. */
  linkBytes(host: string): { tx: number; rx: number };
  destroy(): void;
}

function hostOf(hosts: ReadonlyMap<string, BedHost>, name: string): BedHost {
  const h = hosts.get(name);
  if (!h) throw new Error(`no host ${name} in the bed`);
  return h;
}

function ip(...args: string[]): void {
  const r = Bun.spawnSync(["ip", ...args], { stdout: "ignore", stderr: "pipe" });
  if (r.exitCode !== 0) throw new Error(`ip ${args.join(" ")}: ${r.stderr.toString().trim()}`);
}

function tryTc(ns: string, ...args: string[]): boolean {
  return Bun.spawnSync(["ip", "netns", "exec", ns, "tc", ...args], { stdout: "ignore", stderr: "ignore" }).exitCode === 0;
}

function namespaces(): string[] {
  const out = Bun.spawnSync(["ip", "netns", "list"], { stdout: "pipe" }).stdout.toString();
  return out.split("\n").map((line) => line.split(" ")[0]!).filter((name) => name.startsWith(`${PREFIX}-`));
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Removes the namespaces of beds whose process is gone. */
export function removeLeftoverBeds(): string[] {
  const gone = namespaces().filter((ns) => !alive(Number(ns.split("-")[1])));
  for (const ns of gone) ip("netns", "del", ns);
  return gone;
}

/** Builds the bed; `delayMs` is the one-way delay of each host's link, where netem exists. */
export function createBed(specs: HostSpec[], options: { delayMs?: number; owner?: number } = {}): Bed {
  removeLeftoverBeds();
  const owner = options.owner ?? process.pid;
  const tag = `${PREFIX}-${owner}`;
  const sw = `${tag}-switch`;
  const subnet = 100 + (owner % 100);
  const hosts = new Map<string, BedHost>();
  const made: string[] = [];
  let delayApplied = true;
  try {
    ip("netns", "add", sw);
    made.push(sw);
    ip("-n", sw, "link", "add", "br0", "type", "bridge");
    ip("-n", sw, "link", "set", "br0", "up");
    specs.forEach((spec, i) => {
      const ns = `${tag}-${spec.name}`;
      ip("netns", "add", ns);
      made.push(ns);
      ip("-n", ns, "link", "set", "lo", "up");
      // veth names are short (15 bytes at most), and only ever seen inside their namespace
      ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", `p${i}`, "netns", sw);
      ip("-n", sw, "link", "set", `p${i}`, "master", "br0");
      ip("-n", sw, "link", "set", `p${i}`, "up");
      const address = `10.${subnet}.0.${i + 1}`;
      ip("-n", ns, "addr", "add", `${address}/24`, "dev", "eth0");
      ip("-n", ns, "link", "set", "eth0", "up");
      for (const [where, dev, rate] of [[ns, "eth0", spec.egress], [sw, `p${i}`, spec.ingress]] as const) {
        const delayed = Boolean(options.delayMs) && tryTc(where, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", `${options.delayMs}ms`);
        if (!delayed) delayApplied = false;
        if (!rate) continue;
        const parent = delayed ? ["parent", "1:", "handle", "2:"] : ["root"];
        if (!tryTc(where, "qdisc", "add", "dev", dev, ...parent, "tbf", "rate", rate, "burst", "256kb", "latency", "50ms")) {
          throw new Error(`tc tbf ${rate} on ${spec.name}: refused`);
        }
      }
      hosts.set(spec.name, { name: spec.name, ns, address });
    });
  } catch (err) {
    for (const ns of made) ip("netns", "del", ns);
    throw err;
  }
  return {
    hosts,
    delayApplied: Boolean(options.delayMs) && delayApplied,
    exec(host, argv) {
      return ["ip", "netns", "exec", hostOf(hosts, host).ns, ...argv];
    },
    linkBytes(host) {
      const r = Bun.spawnSync(["ip", "-n", hostOf(hosts, host).ns, "-j", "-s", "link", "show", "dev", "eth0"], { stdout: "pipe" });
      const [link] = JSON.parse(r.stdout.toString()) as Array<{ stats64: { rx: { bytes: number }; tx: { bytes: number } } }>;
      return { tx: link!.stats64.tx.bytes, rx: link!.stats64.rx.bytes };
    },
    destroy() {
      for (const ns of made) {
        if (namespaces().includes(ns)) ip("netns", "del", ns);
      }
    },
  };
}
