// How to run this sgm again, as a process of its own: the compiled binary,
// or from source (bun cli/main.ts) the script before the arguments.

export function selfCommand(): string[] {
  return Bun.main.endsWith(".ts") ? [process.execPath, Bun.main] : [process.execPath];
}
