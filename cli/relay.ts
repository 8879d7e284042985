// sgm relay: runs on an intermediary host with spare memory.

import type { CAC } from "cac";
import { PAGE_BYTES } from "../core/dedup/digest.ts";
import { defaultDigestThreads } from "../core/dedup/digest-pool.ts";
import { SgmError } from "../core/errors.ts";
import { preallocatedStore, type RelayStats, startRelay } from "../core/relay/engine.ts";
import { loadPsk } from "../core/wire/auth.ts";
import { addTlsOptions, readTls, type TlsFlags } from "./tls-flags.ts";
import { formatHostPort } from "../core/net/host-port.ts";
import { parseCount, parseHostPort, parseRate, parseSize, requireString } from "./args.ts";
import { formatBytes } from "../core/units.ts";
import { info, printJson } from "./output.ts";
import { announceReady, parseReadyFd } from "./ready-fd.ts";
import type { Signals } from "./signals.ts";
import type { RelayHttp } from "../core/relay/http.ts";

interface RelayFlags extends TlsFlags {
  listen?: unknown;
  capacity?: unknown;
  pskFile?: unknown;
  ttl?: unknown;
  maxRate?: unknown;
  digestThreads?: unknown;
  http?: unknown;
  readyFd?: unknown;
  prealloc?: boolean;
  json?: boolean;
}

const DEFAULT_TTL_SECONDS = 3600;

export function registerRelay(cli: CAC, signals: Signals): void {
  const command = cli
    .command("relay", "Hold pages in memory for gathers that cannot take them yet")
    .usage("relay --listen HOST:PORT --capacity SIZE --psk-file FILE [options]")
    .option("--listen <host:port>", "Address to listen on")
    .option("--capacity <size>", "Memory to hold pages in, e.g. 8GiB")
    .option("--psk-file <file>", "File holding the pre-shared key of this run's sgm processes");
  addTlsOptions(command)
    .option("--ttl <seconds>", `Drop the pages of a run idle (no put, no release) this long (default ${DEFAULT_TTL_SECONDS})`)
    .option("--max-rate <rate>", "Take at most this much per second from all clients together, e.g. 100MiB/s (as a slower link would)")
    .option("--digest-threads <n>", `Threads that check put pages against their digests beside the one that serves; 0 for that one (default here: ${defaultDigestThreads()}, from the cores: up to 4, leaving 2)`)
    .option("--http <host:port>", "Serve GET /metrics (Prometheus text format) and GET /healthz on this address")
    .option("--prealloc", "Make the whole capacity resident at start, before listening: pages put later take no page faults (for a relay that stands by for evictions)")
    .option("--ready-fd <n>", "Once listening, write 'ready HOST:PORT' and a newline to this file descriptor and close it")
    .option("--json", "Print the final report as JSON on stdout")
    .example("sgm relay --listen 0.0.0.0:7701 --capacity 8GiB --psk-file /etc/sgm/psk --http 127.0.0.1:9701")
    .example("SIGTERM drains: no new runs, the runs it holds finish, then exit 0; SIGINT or a second SIGTERM stops at once")
    .action(async (flags: RelayFlags) => {
      const listen = parseHostPort("--listen", requireString("--listen", flags.listen));
      // A bare number of bytes reaches us as a number.
      const capacity = typeof flags.capacity === "number" ? String(flags.capacity) : requireString("--capacity", flags.capacity);
      const capacityBytes = parseSize("--capacity", capacity);
      if (capacityBytes < PAGE_BYTES) throw new SgmError("usage", `--capacity '${capacity}': less than one ${PAGE_BYTES}-byte page`);
      const ttlSeconds = flags.ttl === undefined ? DEFAULT_TTL_SECONDS : parseCount("--ttl", flags.ttl, 1, 30 * 24 * 3600);
      const maxRate = flags.maxRate === undefined ? undefined : parseRate("--max-rate", String(flags.maxRate));
      const digestThreads = flags.digestThreads === undefined ? defaultDigestThreads() : parseCount("--digest-threads", flags.digestThreads, 0, 64);
      const http = flags.http === undefined ? undefined : parseHostPort("--http", requireString("--http", flags.http));
      const psk = loadPsk(requireString("--psk-file", flags.pskFile));
      const tls = readTls(flags);
      const readyFd = parseReadyFd(flags.readyFd);

      const store = flags.prealloc === true ? await preallocatedStore(capacityBytes, signals.stop, info) : undefined;
      const relay = startRelay({ ...listen, psk, tls, capacityBytes, store, maxRate, digestThreads, ttlMs: ttlSeconds * 1000, signal: signals.stop, log: info });
      const address = formatHostPort(listen.host, relay.port);
      let served: RelayHttp | undefined;
      try {
        // prom-client and what it loads, only for --http: no other relay pays for loading them
        if (http) served = (await import("../core/relay/http.ts")).serveRelayHttp(relay, http.host, http.port);
        info(`relay listening on ${address} (capacity ${formatBytes(capacityBytes)}${maxRate ? `, at most ${formatBytes(maxRate)}/s` : ""})${served ? `; metrics on http://${formatHostPort(http!.host, served.port)}/metrics` : ""}`);
        if (readyFd !== undefined) announceReady(readyFd, address);
      } catch (err) {
        served?.stop();
        await relay.close();
        throw err;
      }
      signals.takeFirstTerm(() => {
        void relay.drain().then(() => {
          info("drained: every run it held has finished");
          void relay.close();
        });
      });
      // Stopping by a signal, or drained, is how a relay ends: not an error.
      await relay.closed;
      served?.stop();
      const stats = relay.stats();
      render(stats);
      if (flags.json) printJson(stats);
      return 0;
    });
}

function render(s: RelayStats): void {
  info(
    `relay stopped: held ${formatBytes(s.used)} of ${formatBytes(s.capacity)} (${s.pages} pages, ${s.runs} runs; at most ${formatBytes(s.peakUsed)}); ` +
      `${formatBytes(s.bytesIn)} in, ${formatBytes(s.bytesOut)} out, ${s.refusedPages} pages refused, ${s.expiredRuns} runs expired`,
  );
}
