// A digest thread of a DigestPool: hashes the pages of each batch it is
// given, in shared memory, and says which batch is done.

import { DIGEST_BYTES, PAGE_BYTES, digestPage } from "./digest.ts";
import { type DigestBatchMemory, readJob } from "./digest-job.ts";

declare const self: Worker;

const batches: DigestBatchMemory[] = [];
const out = new Uint8Array(DIGEST_BYTES);

self.onmessage = (event: MessageEvent<number | DigestBatchMemory>) => {
  if (typeof event.data !== "number") {
    batches[event.data.id] = event.data;
    return;
  }
  const { id, count } = readJob(event.data);
  const { pages, digests } = batches[id]!;
  for (let n = 0; n < count; n++) {
    digestPage(pages.subarray(n * PAGE_BYTES, (n + 1) * PAGE_BYTES), out);
    digests.set(out, n * DIGEST_BYTES);
  }
  self.postMessage(id);
};
