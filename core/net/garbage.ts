// Bun's sockets hand every read to JavaScript in a fresh buffer, and the
// collector, seeing a small heap, let those pile up: the gather of a 1 GiB
// VM peaked at 508 MiB resident while holding 64 MiB of pages. Collecting
// after every 16 MiB received kept it near 250 MiB, at no measurable cost in
// CPU for a process whose heap is small (a collection then takes about a
// millisecond). A process with a large heap pays more per collection (a
// benchmark client holding 512 MiB of pages as objects fell from 1719 to
// 233 MB/s), so only the roles whose collected heap stays small turn this
// on: the gather, and the relay, whose pages are in slabs outside it.
// Those collections were 8 to 15% of the gather's samples in Bun's CPU
// profiler. Bun.gc(false) does less (JSC's collectSync where Bun.gc(true)
// calls collectNow) but, used alone, let the gather peak about 20 MiB
// higher; with every fourth collection a Bun.gc(true), a 1 GiB eviction
// cost the gather about 10% less CPU per GiB at the same peak RSS.

let every = 0;
let received = 0;
let collections = 0;

/** From now on, collect garbage after every `bytes` read from sockets. */
export function collectGarbageEvery(bytes: number): void {
  every = bytes;
}

/** Counts bytes read from a socket. */
export function noteReceived(bytes: number): void {
  if (every === 0) return;
  received += bytes;
  if (received < every) return;
  received = 0;
  Bun.gc(++collections % 4 === 0);
}
