import type { Pool, PoolConfig } from 'pg';

interface TableOptions {
  /** Table holding the records. @default 'idempotency_keys' */
  table?: string | undefined;
  /** Schema of the table; migrate() creates it when missing. @default 'public' */
  schema?: string | undefined;
  /**
   * How long the store's own statements (begin, complete, release, renew, get, purge) wait for
   * their answer, in ms, as pg's per-query `query_timeout`: past it the statement rejects, its
   * connection is discarded and the statement is cancelled on the server. A connection that died
   * without a word (a network black hole) would
   * otherwise hold every statement on it, and its pool slot, forever. Never applies to your
   * queries, nor to the transaction a transactional handler gets.
   * @default 10000
   */
  queryTimeoutMs?: number | undefined;
}

/** Use a pool you own: idemkit never ends it (`close()` leaves it open). */
export interface PostgresPoolOptions extends TableOptions {
  /** Your `pg.Pool`. Transactional mode checks clients out of it with `pool.connect()`. */
  pool: Pool;
  connectionString?: never;
  poolOptions?: never;
}

/** Let the store create (and, on `close()`, end) its own pool. */
export interface PostgresConnectionOptions extends TableOptions {
  /** `postgres://user:pass@host:5432/db`. */
  connectionString: string;
  /** Extra `pg.Pool` settings (`max`, `ssl`, `idleTimeoutMillis`, …). */
  poolOptions?: Omit<PoolConfig, 'connectionString'> | undefined;
  pool?: never;
}

/** `{ pool }` or `{ connectionString, poolOptions? }`, plus `table` and `schema`. */
export type PostgresStoreOptions = PostgresPoolOptions | PostgresConnectionOptions;

const KNOWN = new Set(['pool', 'connectionString', 'poolOptions', 'table', 'schema', 'queryTimeoutMs']);

export const DEFAULT_QUERY_TIMEOUT_MS = 10_000;

export const DEFAULT_TABLE = 'idempotency_keys';
export const DEFAULT_SCHEMA = 'public';

/** Validate up front and name the option in the error. */
export function checkOptions(options: PostgresStoreOptions): void {
  if (typeof options !== 'object' || options === null) {
    throw new TypeError('[idemkit] [postgres] Options must be an object: `{ pool }` or `{ connectionString }`.');
  }
  const unknown = Object.keys(options).filter((name) => !KNOWN.has(name));
  // A misspelt option (`tableName`) would silently keep the default table.
  if (unknown.length > 0) console.warn(`[idemkit] [postgres] Unknown option(s) ignored: ${unknown.join(', ')}.`);
  const hasPool = options.pool !== undefined;
  const hasUrl = options.connectionString !== undefined;
  if (hasPool === hasUrl) {
    throw new TypeError(
      hasPool
        ? '[idemkit] [postgres] Pass either `pool` or `connectionString`, not both.'
        : '[idemkit] [postgres] Missing required option `pool` (a pg.Pool) or `connectionString`.',
    );
  }
  if (hasPool && (typeof options.pool?.query !== 'function' || typeof options.pool.connect !== 'function')) {
    throw new TypeError('[idemkit] [postgres] `pool` must be a pg.Pool (with query() and connect()).');
  }
  // A pg.Client has query() and connect() too, but it is one connection: not connected, every
  // call would wait out storeTimeoutMs; connected, migrate() and transactions fail.
  if (hasPool && typeof (options.pool as { totalCount?: unknown }).totalCount !== 'number') {
    throw new TypeError('[idemkit] [postgres] `pool` must be a pg.Pool, not a pg.Client: `new pg.Pool({ connectionString })`.');
  }
  // pg then asks for every column in binary, and a claim that landed would read as another's
  // record (its flags and texts arrive as Buffers): every first request a 422, its key held.
  const binary = hasPool ? (options.pool as { options?: { binary?: unknown } }).options?.binary : (options.poolOptions as { binary?: unknown } | undefined)?.binary;
  if (binary === true) {
    throw new TypeError("[idemkit] [postgres] The store's pool must not have pg's `binary: true` (the store reads text columns): give the store a pool of its own without it, e.g. `new pg.Pool({ connectionString })`.");
  }
  if (hasPool && options.poolOptions !== undefined) {
    throw new TypeError('[idemkit] [postgres] `poolOptions` applies only with `connectionString`: set them on your own pool.');
  }
  if (hasUrl && (typeof options.connectionString !== 'string' || options.connectionString === '')) {
    throw new TypeError('[idemkit] [postgres] `connectionString` must be a non-empty string.');
  }
  const timeout = options.queryTimeoutMs;
  if (timeout !== undefined && (!Number.isSafeInteger(timeout) || timeout <= 0 || timeout > 2_147_483_647)) {
    throw new TypeError(`[idemkit] [postgres] \`queryTimeoutMs\` must be a positive integer of milliseconds, got ${String(timeout)}.`);
  }
}
