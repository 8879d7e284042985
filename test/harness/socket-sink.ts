// The receiving end of a plain TCP stream for benchmarks, run in a child
// process (its own event loop, as a real peer has): prints its port, counts
// what arrives on each connection and answers one byte once it has all.

export function runSink(expected: number): void {
  const server = Bun.listen<{ got: number }>({
    hostname: "127.0.0.1",
    port: 0,
    socket: {
      open(socket) {
        socket.data = { got: 0 };
      },
      data(socket, chunk) {
        socket.data.got += chunk.length;
        if (socket.data.got === expected) socket.write(new Uint8Array([1]));
      },
    },
  });
  process.stdout.write(`${server.port}\n`);
}
