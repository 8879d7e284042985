// What one destination's feed did, for the gather's report.

export interface FeedStats {
  /** Pages written before switchover (counting re-feeds of changed pages). */
  fedPages: number;
  discardedPages: number;
  /** Pages written after switchover, requested or not. */
  deliveredPages: number;
  /** Page requests the destination sent, and pages they named that were still missing. */
  requests: number;
  requestedPagesServed: number;
  /** Requested pages whose content first had to come from a relay. */
  requestedFromRelays: number;
  /** Requested pages a postcopy source still had: asked of it through the scatter. */
  requestedFromSource: number;
}

export function newFeedStats(): FeedStats {
  return { fedPages: 0, discardedPages: 0, deliveredPages: 0, requests: 0, requestedPagesServed: 0, requestedFromRelays: 0, requestedFromSource: 0 };
}
