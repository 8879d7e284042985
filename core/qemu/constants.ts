// Numbers of QEMU's migration stream (migration/savevm.c, migration/ram.c),
// as described in ../shared/qemu-migration-protocol.md.

export const QEVM_MAGIC = 0x5145564d;
export const QEVM_VERSION = 3;

/** Target page size on x86; the only one sgm carries. */
export const TPS = 4096;

export const Section = {
  EOF: 0x00,
  START: 0x01,
  PART: 0x02,
  END: 0x03,
  FULL: 0x04,
  SUBSECTION: 0x05,
  VMDESCRIPTION: 0x06,
  CONFIGURATION: 0x07,
  COMMAND: 0x08,
  FOOTER: 0x7e,
} as const;

export const RamFlag = {
  FULL: 0x01,
  ZERO: 0x02,
  MEM_SIZE: 0x04,
  PAGE: 0x08,
  EOS: 0x10,
  CONTINUE: 0x20,
  XBZRLE: 0x40,
  HOOK: 0x80,
  COMPRESS_PAGE: 0x100,
  MULTIFD_FLUSH: 0x200,
} as const;

/** Bits below the target page size carry the record's flags. */
export const RAM_FLAG_MASK = TPS - 1;

export const Command = {
  OPEN_RETURN_PATH: 1,
  PING: 2,
  POSTCOPY_ADVISE: 3,
  POSTCOPY_LISTEN: 4,
  POSTCOPY_RUN: 5,
  POSTCOPY_RAM_DISCARD: 6,
  PACKAGED: 7,
  ENABLE_COLO: 8,
  POSTCOPY_RESUME: 9,
  RECV_BITMAP: 10,
  SWITCHOVER_START: 11,
} as const;

export const ReturnPath = {
  SHUT: 1,
  PONG: 2,
  REQ_PAGES_ID: 3,
  REQ_PAGES: 4,
  RECV_BITMAP: 5,
  RESUME_ACK: 6,
  SWITCHOVER_ACK: 7,
} as const;

/** RAM's section identity: idstr "ram", instance 0, version 4. */
export const RAM_IDSTR = "ram";
export const RAM_SECTION_VERSION = 4;

/** QEMU bounds the packaged blob by a be32. */
export const MAX_PACKAGED_BYTES = 0xffffffff;

export function ramFlagName(flags: number): string {
  const names = Object.entries(RamFlag)
    .filter(([, bit]) => flags & bit)
    .map(([name]) => name);
  return names.length ? names.join("|") : `0x${flags.toString(16)}`;
}

export function commandName(cmd: number): string {
  return Object.entries(Command).find(([, n]) => n === cmd)?.[0] ?? `command ${cmd}`;
}
