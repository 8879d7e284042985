// Writes docs/schemas/*.json from cli/report-schemas.ts: `bun test/write-report-schemas.ts`
// after a report changes (test/report-schema.test.ts says when).

import { join } from "node:path";
import { REPORT_SCHEMAS } from "../cli/report-schemas.ts";
import { SCHEMA_DIR } from "./harness/report-schemas.ts";

for (const [name, schema] of Object.entries(REPORT_SCHEMAS)) {
  await Bun.write(join(SCHEMA_DIR, `${name}.json`), `${JSON.stringify(schema, null, 2)}\n`);
}
