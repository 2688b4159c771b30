/**
 * Every statement the store sends, built once per store from the escaped table name. Key
 * material only travels as `$n` parameters. Time is always the database's
 * `statement_timestamp()`: app servers with skewed clocks agree, and inside a long transaction
 * (transactional mode) it is the time of the statement, not of BEGIN as `now()` would be.
 */

const NOW = 'statement_timestamp()';
const ms = (param: string): string => `(${param}::float8 * interval '1 millisecond')`;
/**
 * As bigint, not float8: a float8 reaches the driver as text, and with `extra_float_digits` below
 * 0 (a server or role may set it, down to -15) the server prints only 15 + that many significant
 * digits, so the 13-digit epoch ms came back rounded (to 10 s at -6): leases and expiry moved.
 */
const epochMs = (column: string): string => `floor(extract(epoch FROM ${column}) * 1000)::bigint`;

/**
 * The record as the store reads it, times as epoch ms by the database clock. The time left on a
 * lease uses `clock_timestamp()`: a begin that waited on the winner's row lock started before
 * the winner did, and would otherwise report more than the whole lease. At least 1 ms: the lease
 * was live at the statement's time, and may have ended since (a slow statement); 0 would read as
 * "no lease" to the caller.
 */
const RECORD_COLUMNS = `fingerprint, state, response_status, response_headers, response_body,
  ${epochMs('lease_expires_at')} AS lease_expires_ms,
  ${epochMs('created_at')} AS created_ms,
  ${epochMs('expires_at')} AS expires_ms,
  CASE WHEN state = 'in_progress'
    THEN greatest(1, ceil(extract(epoch FROM (lease_expires_at - clock_timestamp())) * 1000))::bigint
    ELSE 0::bigint END AS lease_remaining_ms`;

/** The holder's condition shared by complete, release and renew: right token, live lease. */
const HELD = `key = $1 AND lease_token = $2 AND state = 'in_progress' AND lease_expires_at > ${NOW}`;

/**
 * Transactional mode remembers its transaction's id (`txid_current()`, sent with BEGIN). If the
 * handler ends that transaction itself (COMMIT or ROLLBACK on the client, perhaps a helper's own
 * BEGIN/COMMIT, or `AND CHAIN`), the session runs under another id or none. No setting is
 * involved, so `RESET ALL` or a `SET` in the handler cannot fool it. `xid` is digits only.
 */
export const BEGIN_TRANSACTION = 'BEGIN; SELECT txid_current()::text AS xid';

const OURS = (xid: string): string => `coalesce(txid_current_if_assigned() = ${xid}, false)`;

/**
 * Whether the session is still in our transaction, then ROLLBACK, then whether the session is
 * read-only (as in `rollbackThenFate`), in one round trip. A handler that only read succeeds on
 * a read-only connection, so its ROLLBACK succeeds too: that connection must not go back.
 */
export const askThenRollback = (xid: string): string =>
  `SELECT ${OURS(xid)} AS ours; ROLLBACK; SELECT current_setting('transaction_read_only') = 'on' AS read_only`;

/**
 * ROLLBACK (of whatever the session is in, even an aborted transaction), then what became of
 * ours, and whether the session is read-only (`transaction_read_only` of the new transaction: a
 * standby, `default_transaction_read_only`), so such a connection is not given back for reuse.
 */
export const rollbackThenFate = (xid: string): string =>
  `ROLLBACK; SELECT txid_status(${xid}) AS fate, current_setting('transaction_read_only') = 'on' AS read_only`;

/** What became of transaction `$1`, asked on another connection when ours died. */
export const FATE = 'SELECT txid_status($1::bigint) AS fate';

/**
 * End backend $1 if it still holds transaction $2 (a txid: its low 32 bits are the backend's xid)
 * and is not running its COMMIT (a slow one is left to finish; its fate is asked again). A pid
 * the server reused for another session holds another transaction, so it is left alone.
 */
export const TERMINATE_OURS = `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
  WHERE pid = $1 AND backend_xid = ($2::bigint % 4294967296)::text::xid
    AND NOT (state = 'active' AND upper(btrim(query, E' \\t\\n;')) = 'COMMIT')`;

export interface Queries {
  readonly begin: string;
  readonly complete: string;
  /** complete inside the store's transaction ($7 its id): updates only in it, and says so. */
  readonly completeInTransaction: string;
  readonly release: string;
  readonly renew: string;
  readonly get: string;
  readonly purge: string;
}

export function buildQueries(table: string): Queries {
  const expired = `r.expires_at <= ${NOW}`;
  // On takeover every column gets the new value; on a live row each keeps its old one.
  const pick = (column: string, fresh: string): string =>
    `${column} = CASE WHEN ${expired} THEN ${fresh} ELSE r.${column} END`;

  /*
   * begin, in one statement ($1 key, $2 fingerprint, $3 our fresh token, $4 lease ms):
   * - `live`: the row as this statement's snapshot sees it. When it is live, return it and write
   *   nothing (the replay path stays read-only).
   * - otherwise upsert. The conflict branch ALWAYS updates (CASE keeps a live row unchanged),
   *   never `DO NOTHING`/`DO UPDATE … WHERE`: a row inserted by a concurrent transaction after our
   *   snapshot is invisible to a plain SELECT in this statement, but ON CONFLICT DO UPDATE locks
   *   and returns its latest committed version, so exactly one row always comes back.
   * - we acquired iff the returned token is ours; we took over iff the row we replaced was an
   *   in-progress one (informational only: `snap` is the snapshot's view).
   */
  const begin = `WITH snap AS (
  SELECT * FROM ${table} WHERE key = $1
), live AS (
  SELECT * FROM snap WHERE expires_at > ${NOW}
), ins AS (
  INSERT INTO ${table} AS r (key, fingerprint, state, lease_token, lease_expires_at, created_at, expires_at)
  SELECT $1::text, $2::text, 'in_progress', $3::text, ${NOW} + ${ms('$4')}, ${NOW}, ${NOW} + ${ms('$4')}
  WHERE NOT EXISTS (SELECT 1 FROM live)
  ON CONFLICT (key) DO UPDATE SET
    ${pick('fingerprint', 'excluded.fingerprint')},
    ${pick('state', 'excluded.state')},
    ${pick('lease_token', 'excluded.lease_token')},
    ${pick('lease_expires_at', 'excluded.lease_expires_at')},
    ${pick('response_status', 'NULL')},
    ${pick('response_headers', 'NULL')},
    ${pick('response_body', 'NULL')},
    ${pick('created_at', 'excluded.created_at')},
    ${pick('expires_at', 'excluded.expires_at')}
  RETURNING r.*
)
SELECT ${RECORD_COLUMNS}, lease_token = $3::text AS acquired,
  lease_token = $3::text AND EXISTS (SELECT 1 FROM snap WHERE state = 'in_progress') AS took_over
FROM ins
UNION ALL
SELECT ${RECORD_COLUMNS}, false AS acquired, false AS took_over FROM live`;

  const complete = `UPDATE ${table} SET state = 'completed', lease_token = NULL, lease_expires_at = NULL,
  response_status = $3::integer, response_headers = $4::jsonb, response_body = $5::bytea,
  expires_at = ${NOW} + ${ms('$6')}
WHERE ${HELD}`;

  const completeInTransaction = `WITH mark AS (
  SELECT coalesce(txid_current_if_assigned() = $7::bigint, false) AS ours
), done AS (
  ${complete.replace(`WHERE ${HELD}`, `WHERE ${HELD} AND (SELECT ours FROM mark)`)}
  RETURNING 1
)
SELECT (SELECT ours FROM mark) AS ours, EXISTS (SELECT 1 FROM done) AS updated`;

  const release = `DELETE FROM ${table} WHERE ${HELD}`;

  const renew = `UPDATE ${table} SET lease_expires_at = ${NOW} + ${ms('$3')}, expires_at = ${NOW} + ${ms('$3')}
WHERE ${HELD}`;

  const get = `SELECT ${RECORD_COLUMNS} FROM ${table} WHERE key = $1 AND expires_at > ${NOW}`;

  /*
   * One bounded batch. `ctid = ANY(ARRAY(…))` makes a TID scan (`ctid IN (subquery)` can turn
   * into a full scan); SKIP LOCKED lets several purgers run without waiting on each other or on
   * a transaction that is completing a row. The outer re-check is belt and braces.
   */
  const purge = `DELETE FROM ${table} WHERE ctid = ANY(ARRAY(
  SELECT ctid FROM ${table} WHERE expires_at <= ${NOW} LIMIT $1 FOR UPDATE SKIP LOCKED
)) AND expires_at <= ${NOW}`;

  return { begin, complete, completeInTransaction, release, renew, get, purge };
}
