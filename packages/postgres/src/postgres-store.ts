import { randomUUID } from 'node:crypto';
import type {
  BeginResult,
  IdempotencyRecord,
  LeaseToken,
  RecordState,
  StoredResponse,
  TransactionalStore,
} from '@idemkit/core';
import pg, { type Pool, type PoolClient, type QueryResult } from 'pg';
import { checkOptions, DEFAULT_QUERY_TIMEOUT_MS, DEFAULT_SCHEMA, DEFAULT_TABLE, type PostgresStoreOptions } from './options.js';
import { checkMs, completeParams, storedKey } from './params.js';
import { BEGIN_TRANSACTION, buildQueries, type Queries } from './queries.js';
import { escapeIdentifier, expiresIndexName, MIGRATE_LOCK_ID, missingGrants, TABLE_GRANTS, TABLE_SHAPE, tableDdl, tableMismatch } from './schema.js';
import { checkOut, giveBack } from './checkout.js';
import { STORE_TYPES } from './pg-types.js';
import { PgTransaction, storeStatement } from './transaction.js';

/** A record row as the queries in `queries.ts` return it. */
interface RecordRow {
  fingerprint: string | null;
  state: RecordState;
  response_status: number | null;
  response_headers: Array<[string, string]> | null;
  response_body: Buffer | null;
  lease_expires_ms: number | null;
  created_ms: number;
  expires_ms: number;
  lease_remaining_ms: number;
}

interface BeginRow extends RecordRow {
  acquired: boolean;
  took_over: boolean;
}

/**
 * The Postgres store: one row per scoped key, one statement (one round trip) per operation,
 * time from the database clock. Also a `TransactionalStore<PoolClient>` for transactional mode.
 */
/** SQLSTATE 42P01: the table does not exist. */
const UNDEFINED_TABLE = '42P01';
/** When a lost claim's release is sent again after the first (see `#releaseLostClaim`), in ms; then every GIVE_BACK_EVERY_MS. */
const GIVE_BACK_MS: readonly number[] = [250, 1_000, 3_000];
const GIVE_BACK_EVERY_MS = 5_000;
/**
 * The largest body the store can read back (127 MiB). `bytea` arrives as text, two characters a
 * byte in the default hex output and up to four under `bytea_output = 'escape'`, and a V8 string
 * holds at most 2^29 - 24 characters: a larger body was written, and then every read of its key
 * (each retry's `begin`, `get`) failed in the driver, so the answer could never be replayed.
 */
const MAX_RESPONSE_BYTES = 127 * 1024 * 1024;

/** pg's `query_timeout` rejection: the statement was sent and may still run on the server. */
function isReadTimeout(error: unknown): boolean {
  return error instanceof Error && error.message === 'Query read timeout';
}

/**
 * SQLSTATE 40001 (serialization_failure) and 40P01 (deadlock_detected). Under a
 * `default_transaction_isolation` of REPEATABLE READ or SERIALIZABLE, a `begin` whose conflicting
 * row committed after its snapshot fails so, as does a `complete` racing its own lease's renewal.
 * Each store statement is its own transaction, rolled back by that error: sent again at once, it
 * runs in a new snapshot that sees the row, and answers as under READ COMMITTED. Before, duplicates
 * of one request got 503s instead of a 409 or the replay.
 */
const RETRIED_CODES: ReadonlySet<unknown> = new Set(['40001', '40P01']);
/** Sends after the first, for those codes. */
const RETRIES = 3;
const mayRetry = (error: unknown, retries: number): boolean => retries < RETRIES && RETRIED_CODES.has((error as { code?: unknown } | null)?.code);

/** SQLSTATE 42501: insufficient_privilege. */
const INSUFFICIENT_PRIVILEGE = '42501';
/** SQLSTATE 25006: read_only_sql_transaction (a standby, `default_transaction_read_only = on`). */
const READ_ONLY = '25006';

/**
 * The server answered the statement with an ERROR: its (autocommit) transaction rolled back, so
 * nothing it wrote landed. Not a FATAL (a terminated backend, a shutdown: the statement may have
 * committed just before), nor a cancel (57014, which can arrive after the commit). `severity` is
 * in the server's `lc_messages` language: read-only is known by its code whatever the language.
 */
function refusedByServer(error: unknown): boolean {
  if (typeof error !== 'object' || error === null) return false;
  const { code, severity } = error as { code?: unknown; severity?: unknown };
  if (typeof code !== 'string') return false;
  return code === READ_ONLY || (severity === 'ERROR' && code !== '57014');
}

const CANCEL_IF_STILL_RUNNING = `SELECT pg_cancel_backend(pid) FROM pg_stat_activity
  WHERE pid = $1 AND state = 'active' AND query <> '' AND starts_with($2::text, query)`;

/** The table ($1) and its expiry index ($2, an index on that table, not just a relation of that name) exist. */
const READY = `SELECT to_regclass($1) IS NOT NULL AND EXISTS (
  SELECT 1 FROM pg_index WHERE indexrelid = to_regclass($2) AND indrelid = to_regclass($1)) AS ready`;

/**
 * What process $1 is doing about a statement that starts as $2 (see CANCEL_IF_STILL_RUNNING):
 * `gone`, `running` it, `done` with it, or `hidden` when the server shows this role no state or
 * query for it (a session whose current user differs from ours, `SET ROLE`; `track_activities`
 * off): then nobody knows.
 */
const STILL_RUNNING = `SELECT CASE
    WHEN a.pid IS NULL THEN 'gone'
    WHEN a.state IS NULL OR a.state = 'disabled' THEN 'hidden'
    WHEN a.state = 'active' AND a.query <> '' AND starts_with($2::text, a.query) THEN 'running'
    ELSE 'done' END AS status
  FROM (SELECT 1) AS one LEFT JOIN pg_stat_activity AS a ON a.pid = $1`;

const timedOutByPool = new WeakMap<Pool, WeakMap<Error, number>>();

/**
 * The server process of each statement on `pool` that hit the read timeout, by its error: pg
 * gives up on the client side only, so the statement goes on waiting on the server (behind a
 * lock, say) on a connection nobody reads, and may still commit. Filled by the pool's 'release'
 * event, which carries that error and the client before the statement rejects. One listener per
 * pool, shared by every store on it.
 */
function timedOutOn(pool: Pool): WeakMap<Error, number> {
  let timedOut = timedOutByPool.get(pool);
  if (timedOut === undefined) {
    const found = new WeakMap<Error, number>();
    pool.on('release', (error: Error | undefined, client: PoolClient) => {
      const pid = (client as { processID?: unknown }).processID;
      if (error !== undefined && isReadTimeout(error) && typeof pid === 'number') found.set(error, pid);
    });
    timedOutByPool.set(pool, (timedOut = found));
  }
  return timedOut;
}

export class PostgresStore implements TransactionalStore<PoolClient> {
  readonly shared = true;
  /** The largest response body the store can read back (127 MiB); the engine refuses a larger `maxBodyBytes`. */
  readonly maxResponseBytes = MAX_RESPONSE_BYTES;
  /** The escaped, schema-qualified table name (`"public"."idempotency_keys"`), for your own queries. */
  readonly table: string;
  /** The pool the store uses: yours, or the one it created from `connectionString`. */
  readonly pool: Pool;
  readonly #ownsPool: boolean;
  readonly #schema: string;
  readonly #tableName: string;
  readonly #indexName: string;
  readonly #sql: Queries;
  /** The per-statement read timeout, or undefined when the pool's own `query_timeout` applies. */
  readonly #queryTimeoutMs: number | undefined;
  #closing: Promise<void> | undefined;
  #closed = false;
  /** The server process of each statement on this pool that hit the read timeout (see `timedOutOn`). */
  readonly #timedOut: WeakMap<Error, number>;

  /** Runs no SQL: call `migrate()` (or apply `sql/schema.sql`) before the first request. */
  constructor(options: PostgresStoreOptions) {
    checkOptions(options);
    const schema = options.schema ?? DEFAULT_SCHEMA;
    const table = options.table ?? DEFAULT_TABLE;
    this.#schema = schema;
    this.#tableName = table;
    this.table = `${escapeIdentifier(schema, 'schema')}.${escapeIdentifier(table, 'table')}`;
    this.#indexName = expiresIndexName(table);
    this.#sql = buildQueries(this.table);
    if (options.pool !== undefined) {
      this.pool = options.pool;
      this.#ownsPool = false;
    } else {
      this.pool = new pg.Pool({ ...options.poolOptions, connectionString: options.connectionString });
      this.#ownsPool = true;
      // An idle connection dropped by the server (restart, failover) emits 'error' on the pool;
      // without a listener that would crash the process. The pool discards that client itself,
      // and queries in flight still reject with the driver error.
      this.pool.on('error', () => undefined);
    }
    this.#timedOut = timedOutOn(this.pool);
    // A pool with a `query_timeout` of its own keeps it, unless the option says otherwise.
    const poolTimeout = (this.pool as { options?: { query_timeout?: unknown } }).options?.query_timeout;
    this.#queryTimeoutMs = options.queryTimeoutMs ?? (typeof poolTimeout === 'number' && poolTimeout > 0 ? undefined : DEFAULT_QUERY_TIMEOUT_MS);
  }

  /**
   * Create the schema (when missing), table and purge index. Idempotent and safe when several
   * app servers call it at once (serialised by a transaction-scoped advisory lock).
   */
  async migrate(): Promise<void> {
    const client = await checkOut(this.pool);
    /** A refusal already worded here: not to be taken for a failed CREATE below. */
    let refusal: Error | undefined;
    try {
      await client.query('BEGIN');
      await client.query(`SELECT pg_advisory_xact_lock(${MIGRATE_LOCK_ID})`);
      // The table is there but this role may not use it (no USAGE on the schema, or missing table
      // rights): before, the first refused statement surfaced as "may not create" (without USAGE)
      // or not at all (migrate() passed, then every begin failed with "permission denied").
      const { rows: [grantsRow] } = await client.query<{ role: string; found: boolean; usage: boolean; missing: string }>({ text: TABLE_GRANTS, values: [this.#schema, this.#tableName], types: STORE_TYPES });
      const grants = grantsRow === undefined ? undefined : missingGrants(grantsRow, this.#schema, this.table);
      if (grants !== undefined) {
        refusal = Object.assign(
          new Error(`[idemkit] [postgres] migrate(): ${this.table} exists, but this role (${grantsRow?.role ?? '?'}) may not use it. As its owner or a superuser, run: ${grants}`),
          { code: INSUFFICIENT_PRIVILEGE },
        );
        throw refusal;
      }
      // Table and index there already (sql/schema.sql applied by a migration tool): no DDL, so an
      // app role without the CREATE privilege can still call migrate() on every boot.
      const index = `${escapeIdentifier(this.#schema, 'schema')}.${escapeIdentifier(this.#indexName, 'table')}`;
      const isReady = async (): Promise<boolean> => (await client.query<{ ready: boolean }>({ text: READY, values: [this.table, index], types: STORE_TYPES })).rows[0]?.ready === true;
      // A table of that name that is not ours (an app's own `idempotency_keys`): CREATE TABLE IF NOT
      // EXISTS would keep it, and every request would fail at the store ("column … does not exist").
      const checkShape = async (): Promise<void> => {
        const { rows } = await client.query<{ name: string; unique_alone: boolean }>({ text: TABLE_SHAPE, values: [this.table], types: STORE_TYPES });
        const mismatch = rows.length === 0 ? undefined : tableMismatch(rows);
        if (mismatch !== undefined) {
          throw new Error(`[idemkit] [postgres] migrate(): ${this.table} is not an idemkit table: ${mismatch}. It may be your app's own table of that name: give the store another \`table\` (or \`schema\`).`);
        }
      };
      await checkShape();
      if (await isReady()) {
        await client.query('COMMIT');
        giveBack(client);
        return;
      }
      // Only when missing: CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege even when it
      // exists. `public` too: hardened databases drop it.
      const found = await client.query('SELECT 1 FROM pg_namespace WHERE nspname = $1', [this.#schema]);
      if (found.rowCount === 0) await client.query(`CREATE SCHEMA ${escapeIdentifier(this.#schema, 'schema')}`);
      await client.query(tableDdl(this.table, this.#indexName));
      // CREATE INDEX IF NOT EXISTS only notices a relation of that name that is something else
      // (a table someone named so): purges would then scan the whole table, unnoticed.
      if (!(await isReady())) {
        throw new Error(`[idemkit] [postgres] migrate(): ${index} exists but is not the expiry index on ${this.table} (another relation has that name), so purges would scan the whole table. Rename that relation, or give the store another \`table\`.`);
      }
      await client.query('COMMIT');
    } catch (error) {
      await client.query('ROLLBACK').catch(() => undefined);
      giveBack(client, true);
      if (error === refusal) throw error;
      if ((error as { code?: unknown }).code === INSUFFICIENT_PRIVILEGE) {
        // The bare driver error ("permission denied for schema public") names neither the table
        // nor the way out; a boot that fails on it should say both.
        const message = `[idemkit] [postgres] migrate(): this role may not create ${this.table} (${(error as Error).message}). Create the table once as a role that may (apply sql/schema.sql with your migration tool, or call migrate() as its owner), then the app role needs only USAGE on the schema and SELECT, INSERT, UPDATE, DELETE on the table; or GRANT CREATE on the schema${this.#schema === 'public' ? '' : ' (on the database, while the schema is missing)'} to this role.`;
        throw Object.assign(new Error(message, { cause: error }), { code: INSUFFICIENT_PRIVILEGE });
      }
      throw error;
    }
    giveBack(client);
  }

  async begin(key: string, fingerprint: string | null, leaseMs: number): Promise<BeginResult> {
    const token = randomUUID() as LeaseToken;
    const lease = checkMs('leaseMs', leaseMs);
    const id = storedKey(key);
    // Checked out here rather than by pool.query, so a claim that never left (no connection to be
    // had: the server down, the pool ended or waited out) is told apart from one that was sent:
    // it cannot have landed, so there is nothing to release. Before, every such failure also sent
    // a release, retried for the whole lease, piling connection attempts on a server that was down.
    const client = await checkOut(this.pool);
    let rows: BeginRow[];
    try {
      rows = await this.#beginRows(client, [id, fingerprint, token, lease]);
    } catch (error) {
      // As pool.query does: the connection is discarded after a failed statement (its 'release'
      // event records a read timeout's server process, see #timedOut).
      giveBack(client, error instanceof Error ? error : true);
      this.#cancelTimedOut(error, this.#sql.begin);
      // The claim may have committed though its answer was lost (a `query_timeout`, a connection
      // cut after the commit): the caller was told the store failed, so the key must not stay
      // claimed, answering 409 to its retries, for a whole lease. Fenced by the token, and sent
      // again while a claim that timed out may still commit (see #releaseLostClaim).
      if ((error as { code?: unknown }).code === UNDEFINED_TABLE) {
        // The first request after a deploy that forgot the table: say what to do.
        const message = `[idemkit] [postgres] Table ${this.table} does not exist: call \`await store.migrate()\` once at startup, or apply sql/schema.sql with your migration tool.`;
        throw Object.assign(new Error(message, { cause: error }), { code: UNDEFINED_TABLE });
      }
      // The server refused the claim itself (read-only, a constraint, a deadlock): its
      // transaction rolled back, so there is nothing to give back. Before, a server that stayed
      // read-only (a standby behind the primary's address, `default_transaction_read_only`) got
      // a release per failed request, resent for the whole lease, each one a new connection.
      if (refusedByServer(error)) throw error;
      const timedOut = isReadTimeout(error);
      this.#releaseLostClaim(id, token, lease, timedOut, timedOut ? this.#timedOut.get(error as Error) : undefined);
      throw error;
    }
    giveBack(client);
    const row = rows[0];
    if (row === undefined) throw new Error('[idemkit] [postgres] begin returned no row (this is a bug; please report it).');
    if (row.acquired) return { kind: 'acquired', token, tookOver: row.took_over };
    return { kind: 'existing', record: toRecord(key, row), leaseRemainingMs: Number(row.lease_remaining_ms) };
  }

  /** The begin statement on `client`, sent again on a serialization failure (see RETRIED_CODES). */
  async #beginRows(client: PoolClient, values: unknown[]): Promise<BeginRow[]> {
    for (let retries = 0; ; retries++) {
      try {
        return (await client.query<BeginRow>(storeStatement(this.#sql.begin, this.#queryTimeoutMs, values))).rows;
      } catch (error) {
        if (!mayRetry(error, retries)) throw error;
      }
    }
  }

  async complete(key: string, token: LeaseToken, response: StoredResponse, ttlMs: number): Promise<boolean> {
    const result = await this.#query(this.#sql.complete, completeParams(key, token, response, ttlMs));
    return result.rowCount === 1;
  }

  async release(key: string, token: LeaseToken): Promise<boolean> {
    const values = [storedKey(key), token];
    // A read-only connection (opened while a failover's address still led to the old primary,
    // and left on top of the pool by a read that worked there): the pool destroyed it, so sent
    // again on another. Nobody retries a failed release: the key stayed claimed for the whole
    // lease, every retry a 409. A failover can leave several such connections idle, so again while
    // the failed one was one of those (each is destroyed, so this ends), and at least once: a
    // server that is read-only itself costs one more. At most the pool's size plus one sends
    // (after `max` stale idle ones, the last goes out on a fresh connection).
    for (let sends = 1; ; sends++) {
      const hadIdle = this.pool.idleCount > 0;
      try {
        return (await this.#query(this.#sql.release, values)).rowCount === 1;
      } catch (error) {
        if ((error as { code?: unknown }).code !== READ_ONLY || (sends > 1 && !hadIdle) || sends > this.#maxConnections()) throw error;
      }
    }
  }

  /** The pool's `max` (pg's default 10). */
  #maxConnections(): number {
    const max = (this.pool as { options?: { max?: unknown } }).options?.max;
    return typeof max === 'number' && max > 0 ? max : 10;
  }

  async renew(key: string, token: LeaseToken, leaseMs: number): Promise<boolean> {
    const result = await this.#query(this.#sql.renew, [storedKey(key), token, checkMs('leaseMs', leaseMs)]);
    return result.rowCount === 1;
  }

  async get(key: string): Promise<IdempotencyRecord | undefined> {
    const { rows } = await this.#query<RecordRow>(this.#sql.get, [storedKey(key)]);
    const row = rows[0];
    return row === undefined ? undefined : toRecord(key, row);
  }

  /** Delete one batch of up to `limit` expired records; returns how many. Loop (or use core's `startPurger`) for more. */
  async purgeExpired(limit = 1000): Promise<number> {
    if (!Number.isSafeInteger(limit) || limit <= 0) {
      throw new RangeError(`[idemkit] [postgres] \`limit\` must be a positive integer, got ${String(limit)}.`);
    }
    const result = await this.#query(this.#sql.purge, [limit]);
    return result.rowCount ?? 0;
  }

  /**
   * Check out a client and open a transaction for one handler (transactional mode). The engine
   * calls this after `begin` acquired the key; see `PgTransaction`.
   */
  async beginTransaction(): Promise<PgTransaction> {
    // Listened to from the moment it is ours; the transaction keeps that listener (see checkOut).
    const client = await checkOut(this.pool);
    let xid: unknown;
    try {
      const results = (await client.query(storeStatement(BEGIN_TRANSACTION, this.#queryTimeoutMs))) as unknown as Array<QueryResult<{ xid: string }>>;
      xid = results[1]?.rows[0]?.xid;
    } catch (error) {
      giveBack(client, true);
      throw error;
    }
    if (typeof xid !== 'string' || !/^[0-9]+$/.test(xid)) {
      giveBack(client, true);
      throw new Error(`[idemkit] [postgres] BEGIN did not report a transaction id (got ${String(xid)}).`);
    }
    return new PgTransaction(client, this.pool, this.#sql.completeInTransaction, xid, this.#queryTimeoutMs);
  }

  /**
   * Release a claim its caller was told failed, fenced by its token (harmless if it never landed).
   * A release that fails (the server out of reach after a failover) is sent again 250 ms, 1 s and
   * 3 s later, then every 5 s. After a read timeout the claim may still commit on the server
   * after a first release found nothing (if the cancel came too late): the store then asks, on
   * the same schedule, whether that statement still runs there, and sends one last release once
   * it does not. Either way only until the claim's lease would have ended: then the key is free
   * to take over.
   */
  #releaseLostClaim(id: string, token: LeaseToken, leaseMs: number, mayLandLater: boolean, pid: number | undefined): void {
    const until = Date.now() + leaseMs;
    let attempt = 0;
    const later = (step: () => void): void => {
      const wait = GIVE_BACK_MS[attempt++] ?? GIVE_BACK_EVERY_MS;
      if (Date.now() + wait < until) setTimeout(step, wait).unref();
    };
    let askable = pid !== undefined;
    const send = (last = false): void => {
      if (this.#closed) return;
      this.#query(this.#sql.release, [id, token]).then(
        (result) => {
          if (result.rowCount === 1 || !mayLandLater || last) return;
          later(askable ? check : send);
        },
        // Not sent, or sent and lost (a connection cut by a failover): send it again either way.
        () => later(() => send(last)),
      );
    };
    // A claim that timed out may commit for as long as its statement runs on the server (it was
    // cancelled, so not for long): only asked about until then, with one release after it as the
    // last word. Releasing every few seconds for the whole lease instead cost a write per retry
    // for each failed request, just when the database was too slow to answer in time.
    const check = (): void => {
      if (this.#closed) return;
      this.#query<{ status: 'gone' | 'hidden' | 'running' | 'done' }>(STILL_RUNNING, [pid, this.#sql.begin]).then(
        ({ rows }) => {
          const status = rows[0]?.status;
          if (status === 'gone' || status === 'done') return send(true);
          if (status === 'running') return later(check);
          // Not shown to this role: resent on the schedule from now on, as when nothing can be asked.
          askable = false;
          later(send);
        },
        () => later(check),
      );
    };
    send();
  }

  /**
   * Cancel the server side of a statement that hit the read timeout (see `#timedOut`), so it
   * neither commits late nor holds a server connection while it waits: without this a long lock
   * left one waiting backend per timed-out statement. Best effort, on another connection.
   */
  #cancelTimedOut(error: unknown, text: string): void {
    const pid = error instanceof Error ? this.#timedOut.get(error) : undefined;
    if (pid === undefined) return;
    // Only that process, and only while it still runs this statement (the text the server shows
    // is cut at track_activity_query_size): a pid the server has since reused, or one a pooler
    // (PgBouncer) made up, never cancels anyone else's work.
    const values = [pid, text];
    this.pool.query({ text: CANCEL_IF_STILL_RUNNING, values, query_timeout: this.#queryTimeoutMs } as pg.QueryConfig).catch(() => undefined);
  }

  /** One of the store's statements, with its read timeout (see `queryTimeoutMs`). */
  async #query<Row extends object = object>(text: string, values: unknown[]): Promise<QueryResult<Row>> {
    for (let retries = 0; ; retries++) {
      try {
        // pool.query releases the client with a read-timeout error, which discards that connection.
        return await this.pool.query<Row>(storeStatement(text, this.#queryTimeoutMs, values));
      } catch (error) {
        if (mayRetry(error, retries)) continue;
        this.#cancelTimedOut(error, text);
        throw error;
      }
    }
  }

  /**
   * Stops the store's own retries (a lost claim's release) and ends the pool only if the store
   * created it (from `connectionString`). Safe to call twice.
   */
  close(): Promise<void> {
    this.#closed = true;
    if (!this.#ownsPool) return Promise.resolve();
    this.#closing ??= this.pool.end();
    return this.#closing;
  }
}

function toRecord(key: string, row: RecordRow): IdempotencyRecord {
  const response: StoredResponse | null =
    row.state === 'completed' && row.response_status !== null
      ? {
          // Number(): int4 and the bigint times arrive as text (and a pool may parse them its own way); the record must not care.
          status: Number(row.response_status),
          headers: (row.response_headers ?? []).map(([name, value]) => [name, value] as const),
          // A plain Uint8Array copy: callers compare and reuse it like the bytes they stored.
          body: new Uint8Array(row.response_body ?? new Uint8Array(0)),
        }
      : null;
  return {
    key,
    fingerprint: row.fingerprint,
    state: row.state,
    leaseExpiresAt: row.state === 'in_progress' && row.lease_expires_ms !== null ? Number(row.lease_expires_ms) : null,
    response,
    createdAt: Number(row.created_ms),
    expiresAt: Number(row.expires_ms),
  };
}

/**
 * Create a Postgres store. Runs no SQL: call `await store.migrate()` once at startup, or apply
 * `sql/schema.sql` with your migration tool.
 *
 * @example
 * import pg from 'pg';
 * import { createPostgresStore } from '@idemkit/postgres';
 *
 * const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL });
 * const store = createPostgresStore({ pool });
 * await store.migrate();
 */
export function createPostgresStore(options: PostgresStoreOptions): PostgresStore {
  return new PostgresStore(options);
}
