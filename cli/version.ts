// The version is baked in at build time (bun build --define SGM_VERSION=...);
// running from source says so.

declare const SGM_VERSION: string | undefined;

export const VERSION: string = typeof SGM_VERSION === "string" ? SGM_VERSION : "0.0.0-source";
