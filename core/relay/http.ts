// A relay's HTTP side, for the service that runs it: GET /metrics in the
// Prometheus text format (prom-client), GET /healthz for a load balancer or
// a systemd health check. Served with Bun.serve on its own address, apart
// from the page port.

import { Counter, Gauge, Registry } from "prom-client";
import { SgmError } from "../errors.ts";
import type { Relay } from "./engine.ts";

export interface RelayHttp {
  readonly port: number;
  stop(): void;
}

export function serveRelayHttp(relay: Relay, host: string, port: number): RelayHttp {
  const registry = metricsOf(relay);
  let server: ReturnType<typeof Bun.serve>;
  try {
    server = Bun.serve({
      hostname: host,
      port,
      fetch: async (request) => {
        const path = new URL(request.url).pathname;
        if (request.method !== "GET") return new Response("only GET\n", { status: 405 });
        if (path === "/metrics") return new Response(await registry.metrics(), { headers: { "content-type": registry.contentType } });
        // draining: still serving its runs, but a balancer should send no new one
        if (path === "/healthz") return relay.draining ? new Response("draining\n", { status: 503 }) : new Response("ok\n");
        return new Response("not found: try /metrics or /healthz\n", { status: 404 });
      },
    });
  } catch (err) {
    throw new SgmError("unavailable", `--http ${host}:${port}: ${(err as Error).message}`, { cause: err });
  }
  return { port: server.port ?? port, stop: () => void server.stop(true) };
}

function metricsOf(relay: Relay): Registry {
  const registry = new Registry();
  const gauge = (name: string, help: string, read: () => number) =>
    new Gauge({
      name,
      help,
      registers: [registry],
      collect() {
        this.set(read());
      },
    });
  // the relay keeps running totals; each scrape adds what they grew by
  const counter = (name: string, help: string, read: () => number) => {
    let seen = 0;
    return new Counter({
      name,
      help,
      registers: [registry],
      collect() {
        const now = read();
        this.inc(now - seen);
        seen = now;
      },
    });
  };
  gauge("sgm_relay_capacity_bytes", "Memory the relay may hold pages in (--capacity).", () => relay.stats().capacity);
  gauge("sgm_relay_held_bytes", "Bytes of distinct pages held now.", () => relay.stats().used);
  gauge("sgm_relay_held_pages", "Distinct pages held now.", () => relay.stats().pages);
  gauge("sgm_relay_peak_held_bytes", "The most bytes of pages held at once since the relay started.", () => relay.stats().peakUsed);
  gauge("sgm_relay_spare_bytes", "Bytes of pages no run holds, kept for an evacuation's other destinations while no run needs the room.", () => relay.stats().spare);
  gauge("sgm_relay_reserved_bytes", "Bytes runs have reserved and not yet filled.", () => relay.stats().reserved);
  gauge("sgm_relay_runs", "Runs holding pages or a reservation.", () => relay.stats().runs);
  gauge("sgm_relay_connections", "Connections from scatters and gathers.", () => relay.stats().connections);
  gauge("sgm_relay_draining", "1 while the relay drains after SIGTERM: it takes no new run.", () => (relay.draining ? 1 : 0));
  counter("sgm_relay_put_bytes_total", "Page bytes of PUTs accepted.", () => relay.stats().bytesIn);
  counter("sgm_relay_get_bytes_total", "Page bytes sent in answer to GETs.", () => relay.stats().bytesOut);
  counter("sgm_relay_refused_pages_total", "Pages refused: the relay or the run's room was full.", () => relay.stats().refusedPages);
  counter("sgm_relay_expired_runs_total", "Runs whose pages were dropped after their TTL.", () => relay.stats().expiredRuns);
  return registry;
}
