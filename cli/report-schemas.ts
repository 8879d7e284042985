// The JSON reports sgm prints with --json, as JSON Schema: the contract
// scripts read them by. Written with TypeBox and checked, when the project
// type-checks, against the TypeScript types the roles build their reports
// from, so a field added, dropped or retyped in one and not the other fails
// `tsc`. docs/schemas/*.json are these schemas as files, kept current by a
// test (test/report-schema.test.ts), which also validates real reports.

import Type, { type Static, type TSchema } from "typebox";
import type { GatherReport } from "../core/gather/engine.ts";
import type { RelayStats } from "../core/relay/engine.ts";
import type { ScatterReport } from "../core/scatter/engine.ts";
import type { EvacuationReport } from "../core/scatter/evacuation.ts";
import type { CheckReport } from "../core/scatter/preflight.ts";
import type { RelayPlan } from "../core/scatter/relay-plan.ts";

const closed = { additionalProperties: false } as const;
const count = (description?: string) => Type.Integer({ minimum: 0, ...(description ? { description } : {}) });
const bytes = (description?: string) => Type.Number({ minimum: 0, ...(description ? { description } : {}) });
const orNull = <T extends TSchema>(schema: T) => Type.Union([schema, Type.Null()]);

const Process = Type.Object(
  {
    cpuUserSeconds: Type.Number({ minimum: 0 }),
    cpuSystemSeconds: Type.Number({ minimum: 0 }),
    mainThreadCpuSeconds: orNull(Type.Number({ minimum: 0, description: "CPU seconds of the thread that runs the event loop (all threads are in the two above); null without /proc." })),
    peakRssBytes: bytes(),
    minorPageFaults: count(),
    bytesReceivedNatively: count("Bytes read from sockets straight into sgm's own buffer (native/socket-receive.c), after Bun's socket reported data; the rest came through Bun's socket."),
    bytesSentNatively: count("Bytes written to sockets by sgm's own sender threads (native/socket-send.c); the rest (handshakes, TLS) went through Bun's socket."),
    pagesHashedByHelpers: count("Pages hashed by the hash helpers (native/page-digest.c), the role's digest threads, beside the thread that read them; 0 without digest threads."),
  },
  { ...closed, description: "What this process cost by its own accounting." },
);

const Switchover = Type.Union([Type.Literal("precopy"), Type.Literal("postcopy")]);

const EvictionReport = Type.Object(
  {
    name: Type.String(),
    ok: Type.Boolean(),
    error: Type.Optional(Type.String()),
    qemu: Type.Object({ source: Type.String(), destination: orNull(Type.String()), machine: Type.String() }, closed),
    switchover: orNull(Switchover),
    queuedMs: orNull(Type.Number({ description: "From the first byte of migration until this VM began to migrate: its wait for a slot (evacuate --max-in-flight); null if it never began." })),
    evictionMs: orNull(Type.Number({ description: "From the first byte of migration until every byte of the final state was held off the source." })),
    downtimeMs: orNull(Type.Number({ description: "Source STOP to destination RESUME." })),
    totalMs: orNull(Type.Number({ description: "From the first byte of migration until the destination completed, if it did while scatter ran." })),
    source: Type.String({ description: "Where the source VM is now: quit, paused (--keep-source), running (eviction failed)." }),
    passes: count("Precopy passes the source made (in its last stream)."),
    switchoverBandwidth: orNull(
      Type.Number({ description: "Bytes per second scatter told the source its switchover decision may assume (avail-switchover-bandwidth, QEMU 8.2 and later): the rate it took the first pass at. null if it did not (older QEMU, or no second pass)." }),
    ),
    sourceStreams: count("Times the source streamed its memory: more than 1 when a relay lost with the only copy of content the VM needed had it stream again."),
    sourceResumes: count("Times a postcopy source was paused and resumed (QEMU's postcopy recovery) to send again what a lost relay took."),
    bytes: Type.Object({ fromSource: bytes(), dedupSaved: bytes() }, closed),
    pages: Type.Object(
      {
        pendingPages: count(),
        urgentPages: count(),
        pages: count(),
        zeroPages: count(),
        newPages: count(),
        dedupPages: count(),
        mapBytes: bytes(),
        requestedFromSource: count(),
      },
      closed,
    ),
    exitCode: Type.Optional(Type.Integer({ description: "The exit code this VM's failure maps to." })),
  },
  closed,
);

const VmEstimate = Type.Object({ name: Type.String(), ramBytes: bytes(), balloonedBytes: bytes(), bytes: bytes() }, closed);
const LeftOut = Type.Object({ address: Type.String(), reason: Type.String() }, closed);

const RelayPlanSchema = Type.Object(
  {
    bytes: bytes("Bytes the VMs are expected to scatter: RAM less ballooned, plus the redirty margin."),
    vms: Type.Array(VmEstimate),
    sourceRate: bytes("Bytes a second."),
    sourceRateFrom: Type.String({ description: '"--source-rate" or "measured".' }),
    destinationRate: bytes("Bytes a second, from a rate probe."),
    replicas: count(),
    chosen: Type.Array(
      Type.Object({ address: Type.String(), free: bytes(), rate: bytes(), expectedBytes: bytes("Bytes the run expects to place there, replicas included.") }, closed),
    ),
    leftOut: Type.Array(LeftOut),
    directBytes: bytes(),
    relayedBytes: bytes("Once; replicas multiply it."),
    expectedEvictionMs: Type.Number({ minimum: 0 }),
    boundMs: Type.Number({ minimum: 0, description: "The least any plan could: the bytes at the source's rate." }),
    shortfall: orNull(Type.Object({ kind: Type.Union([Type.Literal("relay-memory"), Type.Literal("no-relay")]), message: Type.String() }, closed)),
  },
  closed,
);

const ScatterReportSchema = Type.Object(
  {
    ok: Type.Boolean(),
    vms: Type.Array(EvictionReport),
    bytesToGather: bytes("On the wire, frames included, rate probes not."),
    relays: Type.Array(
      Type.Object({
        address: Type.String(),
        pages: count("Pages it holds for this run, put or held by digest; replicas counted on each relay."),
        refusedPages: count(),
        rankedPages: count("New pages meant for relays that had it among their best --replicas by room: the share its room gives it."),
        passedPages: count("Of rankedPages, those placed elsewhere (another relay or the gather) because it, or another of their best, lagged its acknowledgements."),
        bytesSent: bytes(),
        lost: Type.Union([Type.String(), Type.Null()], { description: "Why the relay was lost mid-run (its copies gone, the others' serving); null when it stayed." }),
      }, closed),
    ),
    placement: Type.Object(
      {
        directPages: count(),
        relayedPages: count(),
        dedupPages: count(),
        sharedPages: count("New to this run, but on a relay already for another run of the evacuation: held there for this run too, not sent again (replicas counted on each relay)."),
        replacedPages: count(),
      },
      closed,
    ),
    plan: orNull(RelayPlanSchema),
    planMs: Type.Number({ minimum: 0, description: "Checks, connections, probes and plan, before the first byte of migration." }),
    exitCode: Type.Integer({ description: "0, 3 when some VMs were evicted and the others run on at the source, else the worst failure's." }),
  },
  closed,
);

const EvacuatedVm = Type.Object(
  {
    name: Type.String(),
    to: Type.String({ description: "The gather it was bound for, HOST:PORT." }),
    ramBytes: orNull(bytes("Its RAM, as its QEMU told; null if its QEMU did not answer.")),
    ok: Type.Boolean(),
    error: Type.Optional(Type.String()),
    source: Type.String({ description: "Where the VM is now at the source: quit, paused (--keep-source), running (not evicted), unknown (its QEMU did not answer)." }),
    exitCode: Type.Optional(Type.Integer({ description: "The exit code this VM's failure maps to." })),
    startedAfterMs: orNull(Type.Number({ description: "From the evacuation's start until it began to migrate (after its wait for a slot)." })),
    evictedAfterMs: orNull(Type.Number({ description: "From the evacuation's start until every byte of its final state was held off this host." })),
    eviction: orNull(EvictionReport),
  },
  closed,
);

const EvacuationReportSchema = Type.Object(
  {
    ok: Type.Boolean(),
    vms: Type.Array(EvacuatedVm, { description: "Every VM named, largest first: the order they were given slots in." }),
    destinations: Type.Array(
      Type.Object(
        {
          to: Type.String(),
          vms: Type.Array(Type.String()),
          error: orNull(Type.String({ description: "Why the run to this gather did not start." })),
          run: orNull(Type.Omit(ScatterReportSchema, ["vms"], closed)),
        },
        closed,
      ),
    ),
    host: Type.Object(
      {
        vms: count(),
        evicted: count(),
        failed: count(),
        emptiedAfterMs: orNull(Type.Number({ description: "From the start until the last VM was evicted, when every one was." })),
        bytesFromSources: bytes(),
        dedupSavedBytes: bytes(),
      },
      closed,
    ),
    exitCode: Type.Integer({ description: "0, 3 when some VMs were evicted and the others run on at the source, else the worst failure's." }),
  },
  closed,
);

const ArrivalReport = Type.Object(
  {
    name: Type.String(),
    ok: Type.Boolean(),
    error: Type.Optional(Type.String()),
    exitCode: Type.Optional(Type.Integer()),
    qemu: Type.Object({ source: orNull(Type.String()), destination: Type.String(), machine: Type.String() }, closed),
    totalMs: orNull(Type.Number()),
    downtimeMs: orNull(Type.Number()),
    bytes: Type.Object({ toQemu: bytes() }, closed),
    pages: Type.Object(
      {
        fedPages: count(),
        discardedPages: count(),
        deliveredPages: count(),
        requests: count(),
        requestedPagesServed: count(),
        requestedFromRelays: count(),
        requestedFromSource: count(),
        total: count(),
      },
      closed,
    ),
  },
  closed,
);

const GatherReportSchema = Type.Object(
  {
    ok: Type.Boolean(),
    vms: Type.Array(ArrivalReport),
    bytesFromScatter: bytes("On the wire, frames included, rate probes not."),
    bytesFromRelays: bytes(),
    peakHeldBytes: bytes(),
    relays: Type.Array(Type.Object({ address: Type.String(), pagesFetched: count(), bytesIn: bytes() }, closed)),
    exitCode: Type.Integer(),
  },
  closed,
);

const RelayStatsSchema = Type.Object(
  {
    capacity: bytes(),
    used: bytes(),
    peakUsed: bytes(),
    reserved: bytes(),
    pages: count(),
    spare: bytes("pages held only because an evacuation keeps them; room a run may take"),
    runs: count(),
    bytesIn: bytes(),
    bytesOut: bytes(),
    refusedPages: count(),
    expiredRuns: count(),
    connections: count(),
    queuedBytes: bytes(),
  },
  closed,
);

const CheckReportSchema = Type.Object(
  {
    ok: Type.Boolean(),
    checks: Type.Array(
      Type.Object(
        {
          check: Type.String({ description: 'What was checked: "source NAME", "gather HOST:PORT", "destination NAME", "relay HOST:PORT" or "plan".' }),
          verdict: Type.Union([Type.Literal("ok"), Type.Literal("warn"), Type.Literal("fail")], { description: "warn: it does not hold, but an eviction would still start." }),
          detail: Type.String(),
        },
        closed,
      ),
    ),
    plan: orNull(RelayPlanSchema),
    exitCode: Type.Integer({ description: "0 if an eviction would start, else the code the first failure would stop it with." }),
  },
  closed,
);

/** A report as printed: the role's report and what the process cost. */
const printed = <T extends ReturnType<typeof Type.Object>>(title: string, schema: T) =>
  Type.Object({ ...schema.properties, process: Process }, { ...closed, title, $schema: "https://json-schema.org/draft/2020-12/schema" });

export const REPORT_SCHEMAS = {
  "scatter-report": printed("sgm scatter --json", ScatterReportSchema),
  "scatter-plan": printed("sgm scatter --plan --json", RelayPlanSchema),
  "evacuate-report": printed("sgm evacuate --json", EvacuationReportSchema),
  "gather-report": printed("sgm gather --json", GatherReportSchema),
  "relay-report": printed("sgm relay --json", RelayStatsSchema),
  "check-report": printed("sgm check --json", CheckReportSchema),
} as const;

// Each schema and its TypeScript type must describe the same objects: same keys, each assignable to the other.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? ([keyof A] extends [keyof B] ? ([keyof B] extends [keyof A] ? true : false) : false) : false) : false;
const checks: [
  Same<Static<typeof ScatterReportSchema>, ScatterReport>,
  Same<Static<typeof EvictionReport>, ScatterReport["vms"][number]>,
  Same<Static<typeof RelayPlanSchema>, RelayPlan>,
  Same<Static<typeof EvacuationReportSchema>, EvacuationReport>,
  Same<Static<typeof EvacuatedVm>, EvacuationReport["vms"][number]>,
  Same<Static<typeof GatherReportSchema>, GatherReport>,
  Same<Static<typeof ArrivalReport>, GatherReport["vms"][number]>,
  Same<Static<typeof RelayStatsSchema>, RelayStats>,
  Same<Static<typeof CheckReportSchema>, CheckReport>,
] = [true, true, true, true, true, true, true, true, true];
void checks;
