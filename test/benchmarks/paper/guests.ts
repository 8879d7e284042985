// The benchmark's guests. Linux guests boot once per VM index into a saved
// state (the VM paused first, so the saved migration is one bounded pass),
// and every run restores from it: each method and repetition starts from the
// same memory, in a second rather than a boot. The test guest at a dirty
// rate boots afresh (it fills its memory in a second).

import { rmSync } from "node:fs";
import { join } from "node:path";
import { digestPage, isZeroPage } from "../../../core/dedup/digest.ts";
import { waitForMigrationStatus } from "../../../core/qmp/migration.ts";
import { LINUX_GUEST } from "../../harness/linux-pair.ts";
import { dumpMemory } from "../../harness/memory.ts";
import { killAll } from "../../harness/processes.ts";
import { type QemuBinary, TestVm, type VmOptions } from "../../harness/qemu.ts";

export type Workload = "busy" | "idle" | "dirty";

/** Pages per second the test guest dirties in the "dirty" workload: more than the destination link carries. */
export const DIRTY_RATE = 12_000;

export interface GuestSpec {
  workload: Workload;
  memMiB: number;
  binary: QemuBinary;
}

export interface VmAt {
  source: TestVm;
  destination: TestVm;
}

const seedOf = (v: number) => 100 + v;

function vmOptions(spec: GuestSpec, dir: string, name: string, v: number): VmOptions {
  const base = { dir, name, memMiB: spec.memMiB, seed: seedOf(v), binary: spec.binary };
  if (spec.workload === "dirty") return { ...base, rate: DIRTY_RATE, churn: 0 };
  return { ...base, linux: { ...LINUX_GUEST, churnRate: spec.workload === "idle" ? 0 : LINUX_GUEST.churnRate } };
}

export class Guests {
  private readonly spec: GuestSpec;
  private readonly dir: string;
  private readonly saved = new Map<number, string>();
  /** Per VM index, the digests of its non-zero pages when saved. */
  private readonly contents = new Map<number, Set<string>>();

  constructor(spec: GuestSpec, dir: string) {
    this.spec = spec;
    this.dir = dir;
  }

  /** Boots and saves VMs 0 .. count-1 where not done yet. */
  async prepare(count: number): Promise<void> {
    if (this.spec.workload === "dirty") return;
    const todo = Array.from({ length: count }, (_, v) => v).filter((v) => !this.saved.has(v));
    await Promise.all(todo.map((v) => this.save(v)));
    await killAll();
  }

  private async save(v: number): Promise<void> {
    const vm = await TestVm.start(vmOptions(this.spec, this.dir, `boot${v}`, v));
    await vm.waitSerial(/SGMLINUX check n=1 ok/, 240_000);
    await vm.qmp.execute("stop");
    const memory = await dumpMemory(vm, this.dir, "saved");
    const digests = new Set<string>();
    const digest = new Uint8Array(32);
    for (let at = 0; at < memory.length; at += 4096) {
      const page = memory.subarray(at, at + 4096);
      if (isZeroPage(page)) continue;
      digestPage(page, digest);
      digests.add(Buffer.from(digest).toString("base64"));
    }
    this.contents.set(v, digests);
    const file = join(this.dir, `vm${v}.state`);
    await vm.qmp.execute("migrate", { uri: `file:${file}` });
    await waitForMigrationStatus(vm.qmp, ["completed"], 120_000, `saving VM ${v}`);
    this.saved.set(v, file);
    await vm.kill();
  }

  /**
   * Bytes of distinct non-zero pages across VMs 0 .. count-1 when saved:
   * what the source's link must carry at the least. The test guest makes
   * every page of its memory unique and non-zero.
   */
  uniqueBytes(count: number): number {
    if (this.spec.workload === "dirty") return count * this.spec.memMiB * 2 ** 20;
    const all = new Set<string>();
    for (let v = 0; v < count; v++) for (const d of this.contents.get(v)!) all.add(d);
    return all.size * 4096;
  }

  /** Starts VMs 0 .. count-1 at the source host, running, and their destinations waiting at the destination host. */
  async start(count: number, dir: string, source: string[], destination: string[]): Promise<VmAt[]> {
    return Promise.all(
      Array.from({ length: count }, async (_, v) => {
        const [src, dst] = await Promise.all([
          this.startSource(v, dir, source),
          TestVm.start({ ...vmOptions(this.spec, dir, `vm${v}-in`, v), incoming: true, launcher: destination }),
        ]);
        return { source: src, destination: dst };
      }),
    );
  }

  private async startSource(v: number, dir: string, launcher: string[]): Promise<TestVm> {
    const options = { ...vmOptions(this.spec, dir, `vm${v}`, v), launcher };
    if (this.spec.workload === "dirty") {
      const vm = await TestVm.start(options);
      await vm.waitFilled();
      return vm;
    }
    const vm = await TestVm.start({ ...options, incoming: true });
    await vm.qmp.execute("migrate-incoming", { uri: `file:${this.saved.get(v)!}` });
    await waitForMigrationStatus(vm.qmp, ["completed"], 120_000, `restoring VM ${v}`);
    await vm.qmp.execute("cont");
    return vm;
  }

  removeSaved(): void {
    for (const file of this.saved.values()) rmSync(file, { force: true });
  }
}
