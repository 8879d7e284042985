// The gather's side of QEMU's postcopy recovery (core/qemu/postcopy-recovery.ts)
// on a fresh channel to a paused destination: ask every block's received
// bitmap, settle the page table against it, then POSTCOPY_RESUME and wait
// for the ack. The table must be settled before the ack, since right
// behind it the destination asks again for the pages it was waiting for.

import { SgmError } from "../errors.ts";
import type { ByteSocket } from "../net/byte-socket.ts";
import { TPS } from "../qemu/constants.ts";
import { RecoveryReader } from "../qemu/postcopy-recovery.ts";
import type { PostcopyStreamWriter } from "../qemu/postcopy-writer.ts";
import type { PageTable } from "./page-table.ts";

/**
 * Runs the handshake; `settle` gets what the destination received, by the
 * table's page index. Resolves once acked, with the reader to hand the
 * return path over from (RecoveryReader.handOver).
 */
export async function recoverChannel(
  name: string,
  t: PageTable,
  writer: PostcopyStreamWriter,
  sock: ByteSocket,
  settle: (received: (i: number) => boolean) => void,
): Promise<RecoveryReader> {
  const names = t.blocks.map((b) => b.name);
  const recovery = new RecoveryReader(t.blocks.map((b) => ({ name: b.name, pages: b.usedLength / TPS })));
  sock.setDataHandler((data) => recovery.feed(data));
  void sock.closed.then((reason) => recovery.fail(reason ?? new SgmError("unavailable", `VM ${name}: destination closed the recovery channel`)));
  writer.resumeChannel();
  t.blocks.forEach((_, b) => writer.askReceived(b));
  writer.flush();
  const bitmaps = await bounded(recovery.bitmapsIn, `VM ${name}: the destination sent no received bitmaps`);
  const perBlock = names.map((n) => bitmaps.get(n)!);
  settle((i) => {
    const b = t.blockOf(i);
    return perBlock[b]!.has(i - t.blockStart[b]!);
  });
  writer.resumePostcopy();
  await bounded(recovery.acked, `VM ${name}: the destination did not acknowledge POSTCOPY_RESUME`);
  return recovery;
}

/** QEMU answers at once; a destination silent this long will not (a stuck main loop, say). */
const ANSWER_MS = 60_000;

async function bounded<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new SgmError("unavailable", `${what} within ${ANSWER_MS / 1000} s`)), ANSWER_MS);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}
