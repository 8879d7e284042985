// Prints, last, why each failed test failed, from bun test's JUnit report:
// bun prints a failure's message where the test ran, and a CI log that
// keeps only its tail would otherwise say which test failed but not why.
// Bun writes this XML itself in one fixed shape, so a few patterns read it
// (an XML library would be one more dependency for ten lines).

import { existsSync, readFileSync } from "node:fs";

const path = process.argv[2];
if (!path) throw new Error("usage: failures.ts JUNIT_XML");
if (!existsSync(path)) {
  console.log(`no test report at ${path}: bun test stopped before writing it`);
  process.exit(0);
}

const MAX_LINES = 40;
const xml = readFileSync(path, "utf8");
const entities: Record<string, string> = { "&lt;": "<", "&gt;": ">", "&quot;": '"', "&apos;": "'", "&amp;": "&" };
const decodeXml = (text: string) =>
  text.replace(/&#(\d+);|&lt;|&gt;|&quot;|&apos;|&amp;/g, (m, code: string | undefined) => (code ? String.fromCharCode(Number(code)) : entities[m]!));

const cases = xml.matchAll(/<testcase name="([^"]*)" classname="([^"]*)"[^>]*?file="([^"]*)"[^>]*?(?:\/>|>([\s\S]*?)<\/testcase>)/g);
const failed = [...cases].flatMap(([, name, describe, testFile, body]) => {
  const failure = body?.match(/<failure[^>]*>([\s\S]*?)<\/failure>/);
  const title = [describe, name].filter(Boolean).map((t) => decodeXml(t!)).join(" > ");
  return failure ? [{ title, file: testFile!, text: decodeXml(failure[1]!) }] : [];
});
if (failed.length > 0) console.log(`\nwhy the ${failed.length} failed test(s) failed:`);
for (const f of failed) {
  const lines = f.text.trimEnd().split("\n");
  const shown = lines.length > MAX_LINES ? [...lines.slice(0, MAX_LINES / 2), "  …", ...lines.slice(-MAX_LINES / 2)] : lines;
  console.log(`\n● ${f.file} > ${f.title}\n${shown.map((l) => `  ${l}`).join("\n")}`);
}
