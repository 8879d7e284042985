// What a destination feed gives both of its pumps: the precopy feed before
// switchover (precopy-feed.ts) and the postcopy delivery after it
// (postcopy-delivery.ts).

import type { ByteSocket } from "../net/byte-socket.ts";
import type { PostcopyStreamWriter } from "../qemu/postcopy-writer.ts";
import type { ContentDirectory } from "./content-directory.ts";
import type { FeedStats } from "./feed-stats.ts";
import type { PageTable } from "./page-table.ts";
import type { PageWaits } from "./page-waits.ts";

export interface FeedContext {
  table: PageTable;
  dir: ContentDirectory;
  writer: Pick<PostcopyStreamWriter, "flush">;
  /** The stream towards QEMU: how much it has yet to read, and a wait until it reads. */
  sock: Pick<ByteSocket, "queuedBytes" | "whenWritable">;
  stats: FeedStats;
  /** Pages whose content is on its way from a relay (the feed wakes them). */
  waits: PageWaits;
  /** Asks for content held only on relays; `urgent` when the destination waits for it. */
  fetch(cid: number, urgent: boolean): void;
  /** The pump goes on (its phase of the feed has not ended or failed). */
  active(): boolean;
  fail(err: Error): void;
}
