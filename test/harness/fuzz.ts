// What the fuzz tests share: a seeded generator (the seed is printed, so a
// failure can be run again), mutations of valid bytes, the time budget, and
// a raw peer that authenticates and then writes whatever bytes it is given.

import type { Socket } from "bun";
import { ClientHandshake, type Role } from "../../core/wire/auth.ts";
import { FrameDecoder, frame } from "../../core/wire/frames.ts";

/** Seconds each fuzz target runs: SGM_FUZZ_SECONDS, 3 by default (`make soak` gives it longer). */
export function fuzzBudgetMs(): number {
  const seconds = Number(process.env.SGM_FUZZ_SECONDS ?? 3);
  if (!(seconds > 0)) throw new Error(`SGM_FUZZ_SECONDS=${process.env.SGM_FUZZ_SECONDS}: not a number of seconds`);
  return seconds * 1000;
}

/** The seed: SGM_FUZZ_SEED to repeat a run, else a new one. */
export function fuzzSeed(): number {
  const given = process.env.SGM_FUZZ_SEED;
  return given === undefined ? (Math.random() * 2 ** 32) >>> 0 : Number(given) >>> 0;
}

/** mulberry32: small, fast, and the same sequence for the same seed. */
export class Rng {
  private state: number;

  constructor(seed: number) {
    this.state = seed >>> 0;
  }

  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  }

  /** An integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  chance(p: number): boolean {
    return this.next() < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }

  bytes(n: number): Uint8Array {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i++) out[i] = this.int(256);
    return out;
  }
}

/** Values that find off-by-ones and overflows in length and count fields. */
const EDGES = [0, 1, 2, 7, 8, 31, 32, 33, 63, 64, 65, 255, 256, 257, 4095, 4096, 4097, 0x7fff_ffff, 0x8000_0000, 0xffff_fffe, 0xffff_ffff];

/** A copy of `bytes` with one to a few mutations: bits flipped, bytes set, a field set to an edge value, cut, grown, or spliced. */
export function mutate(rng: Rng, bytes: Uint8Array): Uint8Array {
  // a copy even of a Buffer, whose slice() is a view
  let out = new Uint8Array(bytes);
  const rounds = 1 + rng.int(3);
  for (let r = 0; r < rounds; r++) {
    const at = out.length === 0 ? 0 : rng.int(out.length);
    switch (rng.int(7)) {
      case 0:
        if (out.length > 0) out[at]! ^= 1 << rng.int(8);
        break;
      case 1:
        if (out.length > 0) out[at] = rng.pick([0, 0xff, 0x7f, 0x80, rng.int(256)]);
        break;
      case 2: {
        // a big-endian u32 field, where counts and lengths live
        if (out.length >= 4) new DataView(out.buffer, out.byteOffset).setUint32(Math.min(at, out.length - 4) & ~3, rng.pick(EDGES));
        break;
      }
      case 3:
        out = out.slice(0, at);
        break;
      case 4: {
        const grown = new Uint8Array(out.length + 1 + rng.int(64));
        grown.set(out);
        grown.set(rng.bytes(grown.length - out.length), out.length);
        out = grown;
        break;
      }
      case 5: {
        // a stretch of bytes repeated, as a frame or record sent twice
        const from = rng.int(out.length + 1);
        const to = Math.min(out.length, from + rng.int(256));
        const spliced = new Uint8Array(out.length + (to - from));
        spliced.set(out.subarray(0, to));
        spliced.set(out.subarray(from, to), to);
        spliced.set(out.subarray(to), to + (to - from));
        out = spliced;
        break;
      }
      default:
        if (out.length > 0) out.set(rng.bytes(Math.min(out.length - at, 1 + rng.int(16))), at);
    }
  }
  return out;
}

export interface RawSession {
  /** Frames received after authentication, in order. */
  readonly frames: Array<{ type: number; payload: Uint8Array }>;
  readonly closed: Promise<void>;
  readonly isClosed: boolean;
  write(bytes: Uint8Array): void;
  writeFrame(type: number, payload: Uint8Array): void;
  /** Stops reading: what the peer sends, its end of stream too, waits in the kernel. */
  pause(): void;
  close(): void;
}

/** Connects, authenticates as `role` with `psk`, and from then on writes whatever it is told, well-formed or not. */
export async function rawSession(port: number, psk: Uint8Array, role: Role, maxPayload = 1 << 20): Promise<RawSession> {
  const handshake = new ClientHandshake(psk, role, "server");
  const authenticated = Promise.withResolvers<void>();
  const closed = Promise.withResolvers<void>();
  const frames: RawSession["frames"] = [];
  let done = false;
  let isClosed = false;
  let socket!: Socket<undefined>;
  const decoder = new FrameDecoder(
    () => maxPayload,
    (type, payload) => {
      if (done) {
        frames.push({ type, payload: payload.slice() });
        return;
      }
      const step = handshake.receive(type, payload);
      for (const f of step.send) socket.write(frame(f.type, f.payload));
      if (step.state === "done") {
        done = true;
        authenticated.resolve();
      }
    },
  );
  socket = await Bun.connect({
    hostname: "127.0.0.1",
    port,
    socket: {
      binaryType: "uint8array",
      data: (_s, chunk: Uint8Array) => {
        try {
          decoder.feed(chunk);
        } catch {
          socket.end();
        }
      },
      close: () => {
        isClosed = true;
        authenticated.reject(new Error("closed during authentication"));
        closed.resolve();
      },
      error: () => {},
    },
  });
  const hello = handshake.hello();
  socket.write(frame(hello.type, hello.payload));
  await authenticated.promise;
  return {
    frames,
    closed: closed.promise,
    get isClosed() {
      return isClosed;
    },
    write: (bytes) => void socket.write(bytes),
    writeFrame: (type, payload) => void socket.write(frame(type, payload)),
    pause: () => socket.pause(),
    close: () => socket.terminate(),
  };
}

/** Resolves when `check` holds, polling; rejects with `what` after `ms`. */
export async function eventually(check: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = performance.now() + ms;
  while (!check()) {
    if (performance.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await Bun.sleep(5);
  }
}
