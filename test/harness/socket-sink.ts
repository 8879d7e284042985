// The receiving end of a plain TCP stream for benchmarks, run in a child
// process (its own event loop, as a real peer has): prints its port, counts
// what arrives on each connection and, once it has all, answers with a line
// of the CPU seconds it spent receiving it (user and system, from the
// connection's first byte).

export interface SinkReply {
  cpuUserSeconds: number;
  cpuSystemSeconds: number;
}

export function runSink(expected: number): void {
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
