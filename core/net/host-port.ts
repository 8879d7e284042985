// HOST:PORT as sgm's flags and peers spell it (IPv6 hosts in brackets).

export interface HostPort {
  host: string;
  port: number;
}

/** Parses "host:port" or "[v6]:port"; null if it is not one. */
export function parseHostPort(text: string): HostPort | null {
  const m = /^(\[[^\]]+\]|[^:\s]+):(\d{1,5})$/.exec(text);
  if (!m || Number(m[2]) > 65535) return null;
  return { host: m[1]!.replace(/^\[|\]$/g, ""), port: Number(m[2]) };
}

export function formatHostPort(host: string, port: number): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}
