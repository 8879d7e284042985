// The pages a run sends straight to the gather: PAGE_DATA frames built in
// recycled buffers, and how much of them the gather has taken in, which
// says whether it keeps up.

import type { PeerConnection } from "../wire/connection.ts";
import { RecycledBuffers } from "../net/recycled-buffers.ts";
import { FrameType, PageDataBuilder } from "../wire/messages.ts";

export class DirectPages {
  private readonly gather: PeerConnection;
  private readonly buffers: RecycledBuffers;
  private readonly builder: PageDataBuilder;
  /** PAGE_DATA payload bytes sent to the gather, and taken in by it. */
  private sentBytes = 0;
  private takenBytes = 0;

  constructor(gather: PeerConnection) {
    this.gather = gather;
    this.buffers = new RecycledBuffers(PageDataBuilder.BUFFER_BYTES, () => gather.bytesSent);
    this.builder = new PageDataBuilder(() => this.buffers.acquire());
  }

  /** Adds the page, its digest at digests[digestAt ..]; true when the frame is full and should go. */
  add(page: Uint8Array, digests: Uint8Array, digestAt: number): boolean {
    this.builder.add(page, digests, digestAt);
    return this.builder.full;
  }

  /** Sends the frame being built, if any. */
  flush(): void {
    if (this.builder.pages === 0) return;
    const { payload, buffer } = this.builder.take();
    this.sentBytes += payload.length;
    this.gather.send(FrameType.PAGE_DATA, payload);
    this.buffers.queued(buffer, this.gather.bytesAccepted);
  }

  /** The gather reports how much it has taken in. */
  taken(bytes: number): void {
    this.takenBytes = Math.max(this.takenBytes, bytes);
  }

  /** Less than `window` bytes are sent and not yet taken in, and less than that is queued to go. */
  within(window: number): boolean {
    return this.sentBytes - this.takenBytes < window && this.gather.queuedBytes < window;
  }
}
