// The gather's two checks that no page is wrong at the destination, read
// off a VM's page table:
// - the final page map's digest, which must equal the one scatter computed
//   from the source's stream before the VM may run here (precopy) or be
//   declared evicted (postcopy);
// - before the stream's end, that what the destination was last given for
//   every page is that page's final content.

import { DIGEST_BYTES } from "../dedup/digest.ts";
import { pageMapDigest } from "../dedup/page-map-digest.ts";
import { SgmError } from "../errors.ts";
import { TPS } from "../qemu/constants.ts";
import { injected } from "../test-faults.ts";
import type { ContentDirectory } from "./content-directory.ts";
import { NOT_WRITTEN, type PageTable, PENDING, UNKNOWN, ZERO } from "./page-table.ts";

export function finalMapDigest(vmName: string, table: PageTable, dir: ContentDirectory): string {
  const content = table.content;
  const owed = content.indexOf(PENDING);
  if (owed >= 0) throw new SgmError("data", `VM ${vmName}: ${describePage(table, owed)} is still owed by the source`);
  const wrong = injected("gather-map") ? content.findIndex((c) => c >= 0) : -1;
  return pageMapDigest(content.length, (i, out, at) => {
    const c = content[i]!;
    if (c < 0) return false;
    dir.copyDigest(c, out, at);
    if (i === wrong) for (let k = at; k < at + DIGEST_BYTES; k++) out[k] = out[k]! ^ 0xff;
    return true;
  });
}

/** Throws, naming the first pages, unless the destination was last given every page's final content. */
export function checkDelivery(vmName: string, table: PageTable, dir: ContentDirectory): void {
  const bad: number[] = [];
  for (let i = 0; i < table.total; i++) {
    const final = table.content[i]!;
    const written = table.written[i]!;
    const zero = final === ZERO || final === UNKNOWN;
    const ok = zero
      ? written === ZERO || written === NOT_WRITTEN
      : final >= 0 && written >= 0 && (written === final || sameDigest(dir.digestOf(written), dir.digestOf(final)));
    if (!ok) bad.push(i);
  }
  if (bad.length === 0) return;
  const named = bad.slice(0, 3).map((i) => describePage(table, i)).join(", ");
  throw new SgmError("data", `VM ${vmName}: the destination was not given the final content of ${bad.length} pages (${named}${bad.length > 3 ? ", ..." : ""})`);
}

function describePage(table: PageTable, i: number): string {
  const b = table.blockOf(i);
  const block = table.blocks[b]!;
  return `page ${i - table.blockStart[b]!} (0x${((i - table.blockStart[b]!) * TPS).toString(16)}) of block '${block.name}'`;
}

function sameDigest(a: Uint8Array, b: Uint8Array): boolean {
  for (let k = 0; k < a.length; k++) if (a[k] !== b[k]) return false;
  return true;
}
