import type { Framework, HandlerKind, Library, LoadPath, StoreName } from './config.js';
import type { CrashResult } from './crash.js';
import type { RaceResult } from './race.js';
import type { StoreBenchResult } from './store-bench.js';

/** One line of the HTTP table: a server under one load path, averaged over its runs. */
export interface HttpRow {
  readonly framework: Framework;
  readonly library: Library;
  /** null for the bare server. */
  readonly store: StoreName | null;
  readonly path: LoadPath;
  readonly rps: number;
  readonly p50: number;
  readonly p99: number;
  /** rps over the mean rps of the bare runs right before and after each run; null for bare. */
  readonly ratio: number | null;
  /** Store round trips per request (driver-counted); null where there is no network store. */
  readonly roundTripsPerRequest: number | null;
  /**
   * CPU time of the server process per request, µs: what the library adds to each request on the
   * app server, whatever the load generator and the store take of the shared cores.
   */
  readonly serverCpuPerRequest: number;
  /** CPU time of the Redis server per request, µs (`INFO cpu`); null for rows not on Redis. */
  readonly redisCpuPerRequest: number | null;
  /** Handler runs per request: 1 for a new key, 0 for replays (bare: always 1). */
  readonly handlerRunsPerRequest: number;
  /** Totals over the runs behind the row (requests the server received, handler runs). */
  readonly requests: number;
  readonly handlerRuns: number;
  readonly non2xx: number;
  readonly errors: number;
  readonly runs: number;
  readonly race: RaceResult | null;
}

/** One library × store of the crash check (see `crash.ts`). */
export interface CrashRow extends CrashResult {
  readonly framework: Framework;
  readonly library: Library;
  readonly store: StoreName;
}

export interface BenchReport {
  readonly startedAt: string;
  readonly mode: 'quick' | 'full';
  readonly machine: { readonly cpus: number; readonly cpuModel: string; readonly node: string; readonly loadavg: readonly number[] };
  readonly settings: { readonly duration: number; readonly rounds: number; readonly connections: number; readonly warmup: number; readonly handler: HandlerKind; readonly localCache: boolean };
  readonly services: string;
  readonly http: HttpRow[];
  readonly crash: CrashRow[];
  readonly stores: StoreBenchResult[];
  readonly elapsedSeconds: number;
}
