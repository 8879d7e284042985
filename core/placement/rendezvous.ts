// Weighted rendezvous (highest-random-weight) hashing: each page goes to the
// relays that score highest for its digest. A relay's share of pages is its
// weight over the sum of weights (a relay with twice the room gets about
// twice the pages), and taking a relay out moves only the pages it held.

/** A relay's salt: a 32-bit hash of its address, so scores differ per relay. */
export function relaySalt(address: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < address.length; i++) h = Math.imul(h ^ address.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

function score(salt: number, d0: number, d1: number): number {
  // murmur3's finalizer over the digest's first 64 bits mixed with the salt
  let x = (d0 ^ salt) >>> 0;
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13) ^ d1, 0xc2b2ae35);
  return (x ^ (x >>> 16)) >>> 0;
}

/** rankRelays' scratch: it runs for every page placed on relays, and never re-enters. */
const SCORES: number[] = [];

/**
 * Fills `out` with the indexes of the `count` best-scoring eligible relays
 * for the digest at `digest[at..]`, best first; returns how many it found.
 * `weights` (positive; all 1 when left out) set each relay's share.
 */
export function rankRelays(
  digest: Uint8Array,
  at: number,
  salts: readonly number[],
  eligible: (relay: number) => boolean,
  count: number,
  out: number[],
  weights?: readonly number[],
): number {
  const d0 = (digest[at]! | (digest[at + 1]! << 8) | (digest[at + 2]! << 16) | (digest[at + 3]! << 24)) >>> 0;
  const d1 = (digest[at + 4]! | (digest[at + 5]! << 8) | (digest[at + 6]! << 16) | (digest[at + 7]! << 24)) >>> 0;
  let found = 0;
  const scores = SCORES;
  for (let r = 0; r < salts.length; r++) {
    if (!eligible(r)) continue;
    const h = score(salts[r]!, d0, d1);
    // w / -ln(u), u uniform in (0, 1): the highest of these falls on each
    // relay in proportion to its weight (Schindelhauer and Schomaker)
    const s = weights ? weights[r]! / -Math.log((h + 0.5) / 4294967296) : h;
    // insertion into the short sorted prefix
    let i = Math.min(found, count);
    while (i > 0 && scores[i - 1]! < s) {
      if (i < count) {
        scores[i] = scores[i - 1]!;
        out[i] = out[i - 1]!;
      }
      i--;
    }
    if (i < count) {
      scores[i] = s;
      out[i] = r;
      if (found < count) found++;
    }
  }
  return found;
}
