// Faults a test can inject into a running sgm, to prove that the checks
// meant to catch them do. SGM_TEST_FAULT names one; nothing else reads it.
//   scatter-map      scatter's final page map names a wrong digest for one page
//   gather-map       the gather's does
//   gather-delivery  the gather leaves one page it owes the destination unwritten

export type TestFault = "scatter-map" | "gather-map" | "gather-delivery";

export function injected(which: TestFault): boolean {
  return process.env.SGM_TEST_FAULT === which;
}
