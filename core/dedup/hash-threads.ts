// What hashes pages beside a role's main thread when it is given digest
// threads. Hash helpers (native-digest.ts): each call's pages are split
// between them and the thread that called, hashed where they lie, so the
// role hashes on its own thread as without threads and needs no pool.
// Where they do not start or agree, a pool of digest threads that hash
// copies of the pages in batches (digest-pool.ts), and wherever
// SGM_HASH_HELPERS=0 (for measuring what the helpers save, and for the
// tests of the batches).

import { DigestPool } from "./digest-pool.ts";
import { startHashHelpers } from "./native-digest.ts";

/** The pool the role hands pages to, or null: it hashes them itself, with the helpers where they run. */
export function digestPoolFor(threads: number): DigestPool | null {
  if (threads <= 0) return null;
  if (process.env.SGM_HASH_HELPERS !== "0" && startHashHelpers(threads) > 0) return null;
  return new DigestPool(threads);
}
