// The receiving end of a plain TCP stream for benchmarks, run in a child
// process (its own event loop, as a real peer has): prints its port, counts
// what arrives on each connection and, once it has all, answers with a line
// of the CPU seconds it spent receiving it (user and system, from the
// connection's first byte).
//
// With `native`, it receives as no Bun socket can: read(2) through bun:ffi
// into one buffer used again for every read, where Bun's sockets hand each
// read to JavaScript in a fresh buffer. The difference between the two is
// what a native receive path would save each role per GiB it takes in.

import { dlopen, ptr } from "bun:ffi";

export interface SinkReply {
  cpuUserSeconds: number;
  cpuSystemSeconds: number;
}

export function runSink(expected: number, native = false): void {
  if (native) {
    runNativeSink(expected);
    return;
  }
  const server = Bun.listen<{ got: number; cpu: NodeJS.CpuUsage | null }>({
    hostname: "127.0.0.1",
    port: 0,
    socket: {
      open(socket) {
        socket.data = { got: 0, cpu: null };
      },
      data(socket, chunk) {
        socket.data.cpu ??= process.cpuUsage();
        socket.data.got += chunk.length;
        if (socket.data.got !== expected) return;
        const spent = process.cpuUsage(socket.data.cpu);
        const reply: SinkReply = { cpuUserSeconds: spent.user / 1e6, cpuSystemSeconds: spent.system / 1e6 };
        socket.write(`${JSON.stringify(reply)}\n`);
      },
    },
  });
  process.stdout.write(`${server.port}\n`);
}

/** One connection, blocking calls on this thread: nothing else runs in the sink. */
function runNativeSink(expected: number): void {
  const libc = dlopen("libc.so.6", {
    socket: { args: ["i32", "i32", "i32"], returns: "i32" },
    bind: { args: ["i32", "ptr", "u32"], returns: "i32" },
    listen: { args: ["i32", "i32"], returns: "i32" },
    getsockname: { args: ["i32", "ptr", "ptr"], returns: "i32" },
    accept: { args: ["i32", "ptr", "ptr"], returns: "i32" },
    read: { args: ["i32", "ptr", "u64"], returns: "i64" },
    write: { args: ["i32", "ptr", "u64"], returns: "i64" },
  }).symbols;
  const AF_INET = 2;
  const SOCK_STREAM = 1;
  // struct sockaddr_in: family, port (network order), 127.0.0.1, padding
  const address = new Uint8Array(16);
  new DataView(address.buffer).setUint16(0, AF_INET, true);
  address.set([127, 0, 0, 1], 4);
  const length = new Uint32Array([address.length]);
  const listener = libc.socket(AF_INET, SOCK_STREAM, 0);
  if (listener < 0 || libc.bind(listener, address, address.length) !== 0 || libc.listen(listener, 1) !== 0 || libc.getsockname(listener, address, length) !== 0) {
    throw new Error("native sink: cannot listen on 127.0.0.1");
  }
  process.stdout.write(`${new DataView(address.buffer).getUint16(2, false)}\n`);
  const conn = libc.accept(listener, null, null);
  if (conn < 0) throw new Error("native sink: accept failed");
  const buffer = new Uint8Array(1 << 20);
  const at = ptr(buffer);
  let got = 0;
  let cpu: NodeJS.CpuUsage | null = null;
  while (got < expected) {
    const n = Number(libc.read(conn, at, buffer.length));
    if (n <= 0) throw new Error(`native sink: read gave ${n} after ${got} of ${expected} bytes`);
    cpu ??= process.cpuUsage();
    got += n;
  }
  const spent = process.cpuUsage(cpu!);
  const reply = new TextEncoder().encode(`${JSON.stringify({ cpuUserSeconds: spent.user / 1e6, cpuSystemSeconds: spent.system / 1e6 } satisfies SinkReply)}\n`);
  libc.write(conn, reply, reply.length);
}
