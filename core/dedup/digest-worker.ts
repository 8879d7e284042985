// A digest thread of a DigestPool: hashes the pages of each batch it is
// given, in shared memory, and says which batch is done.

import { PAGE_BYTES, digestPages } from "./digest.ts";
import { type DigestBatchMemory, readJob } from "./digest-job.ts";

declare const self: Worker;

const batches: DigestBatchMemory[] = [];

self.onmessage = (event: MessageEvent<number | DigestBatchMemory>) => {
  if (typeof event.data !== "number") {
    batches[event.data.id] = event.data;
    return;
  }
  const { id, count } = readJob(event.data);
  const { pages, digests } = batches[id]!;
  digestPages(pages, PAGE_BYTES, count, digests);
  self.postMessage(id);
};
