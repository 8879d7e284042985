// A digest thread of a DigestPool: hashes the pages of each batch it is
// given, in shared memory, and says which batch is done.

import { DIGEST_BYTES, PAGE_BYTES, digestPage } from "./digest.ts";

export interface DigestJob {
  id: number;
  pages: Uint8Array;
  digests: Uint8Array;
  count: number;
}

declare const self: Worker;

self.onmessage = (event: MessageEvent<DigestJob>) => {
  const { id, pages, digests, count } = event.data;
  const out = new Uint8Array(DIGEST_BYTES);
  for (let n = 0; n < count; n++) {
    digestPage(pages.subarray(n * PAGE_BYTES, (n + 1) * PAGE_BYTES), out);
    digests.set(out, n * DIGEST_BYTES);
  }
  self.postMessage(id);
};
