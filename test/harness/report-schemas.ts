// Checks a report sgm printed against its schema file in docs/schemas/, the
// one users are pointed to, with ajv (not TypeBox, which wrote it): what
// the file says is what a script may rely on.

import Ajv2020, { type ValidateFunction } from "ajv/dist/2020.js";
import { readFileSync } from "node:fs";
import { join } from "node:path";

export const SCHEMA_DIR = join(import.meta.dir, "..", "..", "docs", "schemas");

const ajv = new Ajv2020({ allErrors: true, strict: true });
const validators = new Map<string, ValidateFunction>();

/** Which schema a command line's report follows, or null if it prints none. */
export function schemaFor(args: readonly string[]): string | null {
  if (!args.includes("--json")) return null;
  const role = args[0];
  if (role === "scatter") return args.includes("--plan") ? "scatter-plan" : "scatter-report";
  if (role === "gather" || role === "relay" || role === "check" || role === "evacuate") return `${role}-report`;
  return null;
}

export function checkReport(args: readonly string[], report: unknown): void {
  const name = schemaFor(args);
  if (!name) return;
  let validate = validators.get(name);
  if (!validate) {
    validate = ajv.compile(JSON.parse(readFileSync(join(SCHEMA_DIR, `${name}.json`), "utf8")));
    validators.set(name, validate);
  }
  if (!validate(report)) {
    throw new Error(`the ${name} report does not follow docs/schemas/${name}.json: ${ajv.errorsText(validate.errors, { separator: "; " })}`);
  }
}
