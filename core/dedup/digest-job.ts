// What a DigestPool and its threads say to each other. A batch's shared
// memory goes to every thread once, when the batch is made; a job is then
// one number naming the batch and how many of its pages to hash, and the
// answer is the batch's id. Messages between two threads arrive in the
// order sent, so a thread always knows a batch before its first job.

/** Pages per batch: 512 KiB, enough to make the message round trip cheap beside the hashing. */
export const BATCH_PAGES = 128;

export interface DigestBatchMemory {
  id: number;
  pages: Uint8Array;
  digests: Uint8Array;
}

const SPAN = BATCH_PAGES + 1;

export function jobMessage(id: number, count: number): number {
  return id * SPAN + count;
}

export function readJob(message: number): { id: number; count: number } {
  return { id: Math.floor(message / SPAN), count: message % SPAN };
}
