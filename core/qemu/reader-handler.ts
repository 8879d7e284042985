// What the stream reader hands on, record by record: the handler it calls
// and the RAM block list it reports.

import type { VmDescription } from "./device-state.ts";

export interface RamBlockInfo {
  name: string;
  usedLength: number;
}

export interface ReaderHandler {
  /** Magic, version and configuration section, byte for byte. */
  onHeader(bytes: Uint8Array): void;
  /** The RAM block list of the RAM section's START. */
  onRamBlocks(blocks: RamBlockInfo[]): void;
  /** A page: its content (valid during the call only), or null when it is all zero. */
  onPage(block: number, page: number, data: Uint8Array | null): void;
  /** A RAM section ended (EOS and footer read). */
  onRamSectionEnd(last: boolean): void;
  /** A command other than PACKAGED; payload valid during the call only. */
  onCommand(cmd: number, payload: Uint8Array): void;
  /** PACKAGED: the embedded stream (LISTEN, device sections, PINGs, RUN); valid during the call only. */
  onPackaged(blob: Uint8Array): void;
  /**
   * Precopy's device state: every byte from the end of the RAM END section
   * up to (not including) the EOF byte. Called once; the stream is complete.
   */
  onDeviceState(bytes: Uint8Array, vmdesc: VmDescription | null): void;
  /** The EOF byte after the last RAM section of a postcopy stream (the stream is complete). */
  onEof(): void;
}
