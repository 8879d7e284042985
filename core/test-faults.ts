// Faults a test can inject into a running sgm, to prove that the checks
// meant to catch them do. SGM_TEST_FAULT names one; nothing else reads it.
//   scatter-map      scatter's final page map names a wrong digest for one page
//   gather-map       the gather's does
//   gather-delivery  the gather leaves one page it owes the destination unwritten
//   gather-withhold  the gather never writes to its destination the pages of
//                    SGM_TEST_FAULT_AT=BLOCK:OFFSET:LENGTH (bytes of that RAM
//                    block), though it holds their content as if it had

export type TestFault = "scatter-map" | "gather-map" | "gather-delivery" | "gather-withhold";

export function injected(which: TestFault): boolean {
  return process.env.SGM_TEST_FAULT === which;
}

/** The pages gather-withhold names: RAM block, first and last page. */
export function withheldPages(): { block: string; first: number; last: number } | null {
  if (!injected("gather-withhold")) return null;
  const m = /^(.+):(\d+):(\d+)$/.exec(process.env.SGM_TEST_FAULT_AT ?? "");
  if (!m) throw new Error("SGM_TEST_FAULT=gather-withhold needs SGM_TEST_FAULT_AT=BLOCK:OFFSET:LENGTH");
  const offset = Number(m[2]);
  return { block: m[1]!, first: Math.floor(offset / 4096), last: Math.floor((offset + Math.max(1, Number(m[3])) - 1) / 4096) };
}
