/** Names shared by the runner and the server processes. */
export type Framework = 'express' | 'fastify' | 'koa';
export type StoreName = 'memory' | 'postgres' | 'redis' | 'redis-cluster' | 'mongodb';
/** What sits in front of the handler: nothing, idemkit, or a library users would pick instead. */
export type Library = 'bare' | 'idemkit' | 'express-idempotency' | 'node-idempotency' | Probe;
/** `--probes`: the floor under any library (see `apps/probes.ts`); not idempotent. */
export type Probe = 'probe-hook' | 'probe-store';
export const PROBES: readonly Probe[] = ['probe-hook', 'probe-store'];
export const isProbe = (library: Library): library is Probe => (PROBES as readonly Library[]).includes(library);
export type LoadPath = 'new-key' | 'replay';
/**
 * What POST /orders does: `hello` answers from memory (the cost of idempotency laid bare);
 * `postgres` inserts one row and answers with its id (an endpoint's usual work).
 */
export type HandlerKind = 'hello' | 'postgres';

/** Service locations, from TEST_* variables (or scripts/services.sh). */
export interface ServiceEnv {
  readonly postgres?: string | undefined;
  readonly redis?: string | undefined;
  readonly redisCluster?: string | undefined;
  readonly mongodb?: string | undefined;
}

/** What one server process runs; passed to it as JSON in BENCH_SERVER. */
export interface ServerSpec {
  readonly framework: Framework;
  readonly library: Library;
  /** The store behind the library (`memory` for bare, where it is unused). */
  readonly store: StoreName;
  readonly runId: string;
  readonly env: ServiceEnv;
  readonly handler: HandlerKind;
  /** The table the `postgres` handler inserts into (created by the runner). */
  readonly ordersTable: string;
  /** idemkit's `leaseMs` (default: core's). The crash check shortens it to see a takeover in seconds. */
  readonly leaseMs?: number;
  /** idemkit's `localCache` (`--local-cache`): replays of stored answers from the server process. */
  readonly localCache?: boolean;
}

/** What GET /__stats answers: counters of the server process. */
export interface ServerStats {
  /** POST requests that reached the app (covered or not). */
  readonly requests: number;
  /** Times the /orders handler ran. */
  readonly runs: number;
  /** Times the slow (50 ms) handler of the race check ran. */
  readonly slowRuns: number;
  /** Times the crash check's handler started (`POST /crash`). */
  readonly crashRuns: number;
  /** Store round trips so far (0 for the memory store and for bare servers). */
  readonly roundTrips: number;
  /** POST requests whose response has not finished or closed yet. */
  readonly inFlight: number;
  /** CPU time this server process has used so far (user + system, µs; `process.cpuUsage()`). */
  readonly cpuMicros: number;
  /** Answers the `probe-store` probe holds (0 for every other server). */
  readonly kept: number;
}

export function envFromProcess(env: NodeJS.ProcessEnv = process.env): ServiceEnv {
  return {
    postgres: env['TEST_POSTGRES_URL'] || undefined,
    redis: env['TEST_REDIS_URL'] || undefined,
    redisCluster: env['TEST_REDIS_CLUSTER_NODES'] || undefined,
    mongodb: env['TEST_MONGODB_URL'] || undefined,
  };
}

/** The order body every benchmarked request sends, and the handler's answer. */
export const ORDER_BODY = JSON.stringify({ sku: 'A1', qty: 2, note: 'benchmark order' });
export const REPLAY_KEY = 'bench-replay-key-0001';
export const SLOW_HANDLER_MS = 50;
/** A `POST /crash` carrying this header never answers: the crash check kills its server meanwhile. */
export const HANG_HEADER = 'x-bench-hang';
/** Stored responses need not outlive a run; the cleanup removes them anyway. */
export const BENCH_TTL_MS = 600_000;

/** The table the `postgres` handler writes to: one per run, created and dropped by the runner. */
export function ordersTable(runId: string): string {
  return `idemkit_bench_orders_${runId}`;
}
