// Pages with their digests, and the relay payloads the relay tests build
// from them.

import { DIGEST_BYTES } from "../../core/dedup/digest.ts";
import { PutBuilder } from "../../core/wire/relay-messages.ts";

export interface Page {
  digest: Uint8Array;
  page: Uint8Array;
}

export function joinDigests(pages: readonly Page[]): Uint8Array {
  const out = new Uint8Array(pages.length * DIGEST_BYTES);
  pages.forEach((p, i) => out.set(p.digest, i * DIGEST_BYTES));
  return out;
}

/** A PUT payload of the pages under `run`. */
export function putPayload(run: Uint8Array, seq: number, pages: readonly Page[]): Uint8Array {
  const builder = new PutBuilder();
  for (const p of pages) builder.add(p.digest, 0, p.page);
  return builder.take(run, seq, new Uint8Array(0)).payload;
}
