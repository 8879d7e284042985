// Captures a real QEMU migration stream into memory, for the stream tests.
// The source migrates to a unix socket the harness listens on; without a
// return path QEMU closes the socket when it is done. Capture is bounded so a
// guest that never converges cannot eat the machine's memory.

import { join } from "node:path";
import { setCapabilities, setParameters } from "../../core/qmp/migration.ts";
import type { TestVm } from "./qemu.ts";

export async function captureStream(vm: TestVm, dir: string, maxBytes = 4 * vm.memBytes): Promise<Uint8Array> {
  const path = join(dir, `${vm.name}.capture.sock`);
  const chunks: Uint8Array[] = [];
  let total = 0;
  const done = Promise.withResolvers<void>();
  const listener = Bun.listen({
    unix: path,
    socket: {
      data(socket, data) {
        chunks.push(new Uint8Array(data));
        total += data.length;
        if (total > maxBytes) {
          socket.terminate();
          done.reject(new Error(`capture of ${vm.name} exceeded ${maxBytes} bytes: the guest does not converge`));
        }
      },
      close() {
        done.resolve();
      },
      error(_socket, err) {
        done.reject(err);
      },
    },
  });
  try {
    await setCapabilities(vm.qmp, { events: true });
    await setParameters(vm.qmp, { "max-bandwidth": 4 * 1024 * 1024 * 1024 });
    await vm.qmp.execute("migrate", { uri: `unix:${path}` });
    await done.promise;
  } finally {
    listener.stop(true);
  }
  return new Uint8Array(Buffer.concat(chunks));
}
