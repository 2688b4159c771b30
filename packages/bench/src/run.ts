// `pnpm bench [--quick]`: what idempotency costs. Servers run in their own processes on 127.0.0.1;
// this process only drives them (autocannon) and prints one table (and writes bench-results/*.json).
import { randomBytes } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { isProbe, ordersTable, type Framework, type LoadPath, type ServerSpec, type ServiceEnv, type StoreName } from './config.js';
import { CRASH_LEASE_MS, crashCheck } from './crash.js';
import { load, primeReplay, type LoadResult } from './load.js';
import { makePlan, parseArgs, type Plan, type Target } from './plan.js';
import { label, startServer, type RunningServer } from './processes.js';
import { ordersTableFor } from './orders-table.js';
import { raceCheck, type RaceResult } from './race.js';
import { redisCpu, type RedisCpu } from './redis-cpu.js';
import type { BenchReport, CrashRow, HttpRow } from './results.js';
import { acquireServices } from './services.js';
import { benchStore, type StoreBenchResult } from './store-bench.js';
import { crashTable, httpTable, storeTable } from './table.js';

const log = (line: string): void => {
  process.stderr.write(`[bench] ${line}\n`);
};

interface Measured {
  readonly result: LoadResult;
  readonly requests: number;
  readonly handlerRuns: number;
  readonly roundTrips: number;
  readonly cpuMicros: number;
  /** null when the server's store is not Redis. */
  readonly redisCpuMicros: number | null;
}

/** One autocannon run, with the server's own counters read before and after. */
async function measure(server: RunningServer, path: LoadPath, plan: Plan, redis: RedisCpu | null): Promise<Measured> {
  // Again before every replay run: the new-key runs may have pushed the replay key out of a
  // bounded store (the memory store keeps 10,000), and its re-run belongs outside the window.
  if (path === 'replay') {
    const status = await primeReplay(server.url);
    if (status !== 201) log(`  !! ${label(server.spec)} answered the replay key with ${status} before a replay run`);
  }
  const onRedis = redis !== null && server.spec.library !== 'bare' && server.spec.store === 'redis' ? redis : null;
  const redisBefore = onRedis ? await onRedis.micros() : 0;
  const before = await server.stats();
  const result = await load(server.url, path, { duration: plan.duration, connections: plan.connections });
  const after = await server.settledStats();
  const redisCpuMicros = onRedis ? (await onRedis.micros()) - redisBefore : null;
  const requests = after.requests - before.requests;
  const handlerRuns = after.runs - before.runs;
  log(`  ${label(server.spec).padEnd(34)} ${path.padEnd(7)} ${Math.round(result.rps).toString().padStart(6)} req/s  p99 ${result.p99} ms`);
  if (result.non2xx > 0 || result.errors > 0) log(`  !! ${result.non2xx} non-2xx, ${result.errors} errors`);
  return { result, requests, handlerRuns, roundTrips: after.roundTrips - before.roundTrips, cpuMicros: after.cpuMicros - before.cpuMicros, redisCpuMicros };
}

const mean = (values: readonly number[]): number => values.reduce((a, b) => a + b, 0) / Math.max(1, values.length);

function row(framework: Framework, target: Target | null, path: LoadPath, runs: readonly Measured[], ratios: readonly number[], race: RaceResult | null): HttpRow {
  const requests = runs.reduce((a, r) => a + r.requests, 0);
  const networked = target !== null && target.store !== 'memory';
  return {
    framework,
    library: target?.library ?? 'bare',
    store: target === null || isProbe(target.library) ? null : target.store,
    path,
    rps: mean(runs.map((r) => r.result.rps)),
    p50: mean(runs.map((r) => r.result.p50)),
    p99: mean(runs.map((r) => r.result.p99)),
    ratio: target === null ? null : mean(ratios),
    roundTripsPerRequest: networked ? runs.reduce((a, r) => a + r.roundTrips, 0) / Math.max(1, requests) : null,
    serverCpuPerRequest: runs.reduce((a, r) => a + r.cpuMicros, 0) / Math.max(1, requests),
    redisCpuPerRequest: runs.some((r) => r.redisCpuMicros === null) ? null : runs.reduce((a, r) => a + (r.redisCpuMicros ?? 0), 0) / Math.max(1, requests),
    handlerRunsPerRequest: runs.reduce((a, r) => a + r.handlerRuns, 0) / Math.max(1, requests),
    requests,
    handlerRuns: runs.reduce((a, r) => a + r.handlerRuns, 0),
    non2xx: runs.reduce((a, r) => a + r.result.non2xx, 0),
    errors: runs.reduce((a, r) => a + r.result.errors, 0),
    runs: runs.length,
    race,
  };
}

/**
 * One framework: its bare server and every target start together; then per path and round the
 * runs alternate bare, T1, bare, T2, …, bare, and each target's ratio is taken against the two
 * bare runs around it, so drift (the machine's other load, thermal state) cancels out.
 */
async function benchFramework(framework: Framework, plan: Plan, env: ServiceEnv, runId: string): Promise<HttpRow[]> {
  const targets = plan.targets(framework);
  log(`${framework}: starting ${targets.length + 1} servers`);
  const servers: RunningServer[] = [];
  const redis = env.redis && targets.some((t) => t.store === 'redis') ? await redisCpu(env.redis) : null;
  try {
    // Started together (nothing is measured yet); pushed as they come so a failure still stops them.
    await Promise.all(
      [{ library: 'bare' as const, store: 'memory' as const }, ...targets].map(async (spec, i) => {
        const server = await startServer({ framework, ...spec, runId: `${runId}_${framework}_${spec.library.replaceAll('-', '_')}`, env, handler: plan.handler, ordersTable: ordersTable(runId), localCache: plan.localCache });
        servers[i] = server;
      }),
    ).catch(async (error: unknown) => {
      await Promise.all(servers.filter(Boolean).map((s) => s.stop().catch(() => undefined)));
      servers.length = 0;
      throw error;
    });
    const [bare, ...measured] = servers as [RunningServer, ...RunningServer[]];
    const races = new Map<RunningServer, RaceResult>();
    for (const server of measured) {
      // A probe is no idempotency layer: 50 parallel duplicates run its handler 50 times.
      if (isProbe(server.spec.library)) continue;
      const race = await raceCheck(server);
      races.set(server, race);
      log(`  race ${label(server.spec).padEnd(34)} handler ran ${race.handlerRuns}× for ${race.requests} parallel requests ${JSON.stringify(race.statuses)}`);
    }
    for (const server of servers) {
      await load(server.url, 'new-key', { duration: plan.warmup, connections: plan.connections });
      const status = await primeReplay(server.url);
      if (status !== 201) log(`  !! ${label(server.spec)} answered the replay key's first request with ${status}`);
    }
    const rows: HttpRow[] = [];
    for (const path of ['new-key', 'replay'] as const) {
      const bareRuns: Measured[] = [];
      const runs = new Map<RunningServer, Measured[]>(measured.map((s) => [s, []]));
      const ratios = new Map<RunningServer, number[]>(measured.map((s) => [s, []]));
      for (let round = 0; round < plan.rounds; round++) {
        const order = round % 2 === 0 ? measured : [...measured].reverse();
        let previous = await measure(bare, path, plan, redis);
        bareRuns.push(previous);
        for (const server of order) {
          const run = await measure(server, path, plan, redis);
          const next = await measure(bare, path, plan, redis);
          bareRuns.push(next);
          runs.get(server)?.push(run);
          ratios.get(server)?.push(run.result.rps / mean([previous.result.rps, next.result.rps]));
          previous = next;
        }
      }
      rows.push(row(framework, null, path, bareRuns, [], null));
      measured.forEach((server, i) => {
        const target = targets[i] as Target;
        rows.push(row(framework, target, path, runs.get(server) ?? [], ratios.get(server) ?? [], races.get(server) ?? null));
      });
    }
    return rows;
  } finally {
    await Promise.all(servers.map((s) => s.stop().catch((error: unknown) => log(`stopping ${label(s.spec)}: ${String(error)}`))));
    await redis?.close();
  }
}

/** ms Redis keeps `key` before it expires (null when the key is gone or has no TTL). */
async function redisTtl(url: string, key: string): Promise<number | null> {
  const { Redis } = await import('ioredis');
  const client = new Redis(url);
  try {
    const ttl = await client.pttl(key);
    return ttl >= 0 ? ttl : null;
  } finally {
    await client.quit();
  }
}

/** The crash check (see `crash.ts`) for each library × shared store of the plan, one after another. */
async function benchCrash(crash: NonNullable<Plan['crash']>, plan: Plan, env: ServiceEnv, runId: string): Promise<CrashRow[]> {
  const rows: CrashRow[] = [];
  for (const { library, store } of crash.targets) {
    const spec: ServerSpec = {
      framework: crash.framework,
      library,
      store,
      runId: `${runId}_crash_${library.replaceAll('-', '_')}_${store}`,
      env,
      handler: plan.handler,
      ordersTable: ordersTable(runId),
      ...(library === 'idemkit' ? { leaseMs: CRASH_LEASE_MS } : {}),
    };
    const redis = env.redis;
    // Its in-progress record is a plain key with the response TTL (see peers/node-idempotency.ts).
    const heldFor =
      library === 'node-idempotency' && redis
        ? async (key: string) => {
            const { nodeIdempotencyStorageKey } = await import('./peers/node-idempotency.js');
            return redisTtl(redis, nodeIdempotencyStorageKey(spec.runId, 'POST', '/crash', key));
          }
        : undefined;
    const result = await crashCheck(() => startServer(spec), library === 'idemkit' ? CRASH_LEASE_MS : null, heldFor);
    log(`  crash ${label(spec).padEnd(34)} ${JSON.stringify(result)}`);
    rows.push({ framework: crash.framework, library, store, ...result });
  }
  return rows;
}

/** Rows where what was measured is not what a working library does: said out loud, not hidden. */
function anomalies(rows: readonly HttpRow[], connections: number): string[] {
  const notes: string[] = [];
  for (const r of rows) {
    const name = `${r.framework}/${r.library}${r.store ? `/${r.store}` : ''} ${r.path}`;
    if (r.non2xx > 0 || r.errors > 0) notes.push(`${name}: ${r.non2xx} non-2xx responses, ${r.errors} socket errors/timeouts`);
    if (r.library !== 'bare' && !isProbe(r.library)) {
      const expected = r.path === 'new-key' ? 1 : 0;
      // Up to `connections` requests per run are cut off by autocannon's stop: the server counted
      // them, but the binding may skip the handler for a client that is gone.
      if (Math.abs(r.handlerRuns - expected * r.requests) > connections * r.runs) {
        notes.push(`${name}: handler ran ${r.handlerRunsPerRequest.toFixed(3)} times per request (expected ${expected})`);
      }
    }
  }
  return notes;
}

async function main(): Promise<void> {
  const started = performance.now();
  const plan = makePlan(parseArgs(process.argv.slice(2)));
  const runId = randomBytes(4).toString('hex');
  log(
    `${plan.mode} run ${runId}: ${plan.duration} s runs, ${plan.rounds} round(s), ${plan.connections} connections, ` +
      `node ${process.version}, ${cpus().length} cpus, load ${loadavg().map((l) => l.toFixed(1)).join(' ')}`,
  );
  const services = await acquireServices(log);
  let http: HttpRow[] = [];
  let crash: CrashRow[] = [];
  const stores: StoreBenchResult[] = [];
  const orders = plan.handler === 'postgres' && plan.frameworks.length > 0 ? await ordersTableFor(services.env, ordersTable(runId)) : null;
  try {
    for (const framework of plan.frameworks) http = http.concat(await benchFramework(framework, plan, services.env, runId));
    if (plan.crash) {
      log(`crash check on ${plan.crash.framework}`);
      crash = await benchCrash(plan.crash, plan, services.env, runId);
    }
    for (const store of plan.stores) {
      log(`store bench: ${store}`);
      stores.push(await benchStore(store as StoreName, services.env, `${runId}_sb_${store.replace('-', '_')}`, plan.storeSeconds));
    }
  } finally {
    await orders?.drop();
    await services.release();
  }
  const report: BenchReport = {
    startedAt: new Date().toISOString(),
    mode: plan.mode,
    machine: { cpus: cpus().length, cpuModel: cpus()[0]?.model ?? 'unknown', node: process.version, loadavg: loadavg() },
    settings: { duration: plan.duration, rounds: plan.rounds, connections: plan.connections, warmup: plan.warmup, handler: plan.handler, localCache: plan.localCache },
    services: services.source,
    http,
    crash,
    stores,
    elapsedSeconds: (performance.now() - started) / 1000,
  };
  const dir = fileURLToPath(new URL('../bench-results/', import.meta.url));
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `${report.startedAt.replaceAll(':', '-').replace(/\..*$/, '')}-${plan.mode}.json`);
  writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);

  const out: string[] = [];
  out.push(
    `idemkit bench (${plan.mode}): ${report.machine.cpus} × ${report.machine.cpuModel}, Node ${process.version}, ` +
      `load average ${report.machine.loadavg.map((l) => l.toFixed(1)).join(' ')} at the end`,
  );
  out.push(`handler: ${plan.handler === 'hello' ? 'hello (a JSON answer from memory)' : 'postgres (one INSERT … RETURNING id per run of the handler)'}`);
  if (plan.localCache) out.push('idemkit runs with `localCache: true` (replays of stored answers from the server process)');
  out.push(`autocannon: ${plan.connections} connections, ${plan.duration} s per run, ${plan.rounds} round(s), bare runs alternated with each library run`);
  if (http.length > 0) out.push('', httpTable(http));
  if (crash.length > 0) {
    out.push(
      '',
      `Crash check (${crash[0]?.framework}): a server is killed (SIGKILL) while the handler runs; the same request is retried on a fresh server every 100 ms (times from the kill):`,
      '',
      crashTable(crash),
    );
    if (crash.some((r) => r.library === 'node-idempotency' && r.recoveredStatus === null)) {
      out.push('', "node-idempotency's in-progress record has no lease: it lives as long as a stored answer (cacheTTLMS: 10 min in this bench, 24 h by default).");
    }
  }
  if (stores.length > 0) out.push('', `Store micro-benchmark (32 concurrent callers, ${plan.storeSeconds} s per phase):`, '', storeTable(stores));
  const notes = anomalies(http, plan.connections);
  if (notes.length > 0) out.push('', 'Anomalies:', ...notes.map((n) => `- ${n}`));
  out.push('', `${Math.round(report.elapsedSeconds)} s; results in ${file}`);
  process.stdout.write(`${out.join('\n')}\n`);
}

main().catch((error: unknown) => {
  process.stderr.write(`[bench] failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  // A client left open by the failure must not keep the run alive.
  process.exit(1);
});
