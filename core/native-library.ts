// Loading sgm's own native code (native/*.c), which dist/sgm embeds. To
// load an embedded library Bun writes it into TMPDIR and dlopen()s that
// file; where TMPDIR is mounted noexec, as hardened hosts mount /tmp, the
// kernel refuses to map it. The library is then loaded from an anonymous
// file in memory (memfd_create), which no mount option covers. From source
// the library is a file of the checkout and loads directly.

import { dlopen, type FFIFunction, type Library } from "bun:ffi";
import { closeSync, readFileSync, writeSync } from "node:fs";

const MFD_CLOEXEC = 1;

/** `path`'s library with `symbols`, from memory where its file cannot be mapped executable; throws if neither loads. */
export function openLibrary<Fns extends Record<string, FFIFunction>>(path: string, symbols: Fns): Library<Fns> {
  try {
    return dlopen(path, symbols);
  } catch (first) {
    let fd = -1;
    try {
      fd = memoryFile(readFileSync(path));
      return dlopen(`/proc/self/fd/${fd}`, symbols);
    } catch (second) {
      throw new Error(`${(first as Error).message}; from memory: ${(second as Error).message}`);
    } finally {
      // the mapping outlives the descriptor
      if (fd >= 0) closeSync(fd);
    }
  }
}

function memoryFile(bytes: Uint8Array): number {
  const libc = dlopen("libc.so.6", { memfd_create: { args: ["ptr", "u32"], returns: "i32" } });
  try {
    const fd = libc.symbols.memfd_create(Buffer.from("sgm-native\0"), MFD_CLOEXEC);
    if (fd < 0) throw new Error("memfd_create failed");
    for (let at = 0; at < bytes.length; ) at += writeSync(fd, bytes, at);
    return fd;
  } finally {
    libc.close();
  }
}
