/**
 * Table layout and DDL. The same text ships as `sql/schema.sql` (for users with their own
 * migration tool); a test keeps the two identical.
 */
import { createHash } from 'node:crypto';

/** Postgres truncates longer identifiers silently; we refuse them instead. */
const MAX_IDENTIFIER_BYTES = 63;

/** Quote an identifier once, at construction: `my"table` → `"my""table"`. */
export function escapeIdentifier(name: string, option: string): string {
  if (typeof name !== 'string' || name === '') {
    throw new TypeError(`[idemkit] [postgres] \`${option}\` must be a non-empty string.`);
  }
  if (name.includes('\0')) throw new TypeError(`[idemkit] [postgres] \`${option}\` must not contain NUL.`);
  if (Buffer.byteLength(name) > MAX_IDENTIFIER_BYTES) {
    throw new TypeError(`[idemkit] [postgres] \`${option}\` must be at most ${MAX_IDENTIFIER_BYTES} bytes (Postgres would truncate it).`);
  }
  return `"${name.replaceAll('"', '""')}"`;
}

const INDEX_SUFFIX = '_expires_at_idx';

/** The name of the purge index for `table`, truncated the way Postgres would (bytes, not chars). */
export function expiresIndexName(table: string): string {
  const name = truncate(`${table}${INDEX_SUFFIX}`, MAX_IDENTIFIER_BYTES);
  // A 63-byte table name truncates back to itself: CREATE INDEX IF NOT EXISTS would then find
  // the table under that name and create no index at all. Such a table gets a cut name plus a
  // hash of the whole name, so it also meets no index of a shorter table or of another long
  // table with the same start. (Other names stay as they were: existing indexes are found.)
  if (name !== table) return name;
  const hash = createHash('sha256').update(table).digest('hex').slice(0, 8);
  return `${truncate(table, MAX_IDENTIFIER_BYTES - INDEX_SUFFIX.length - hash.length - 1)}_${hash}${INDEX_SUFFIX}`;
}

/** The first `max` bytes of `text`, cut on a character boundary so it stays valid UTF-8. */
function truncate(text: string, max: number): string {
  const bytes = Buffer.from(text);
  if (bytes.length <= max) return text;
  let cut = max;
  while (cut > 0 && ((bytes[cut] ?? 0) & 0xc0) === 0x80) cut--;
  return bytes.subarray(0, cut).toString();
}

/**
 * CREATE TABLE + index, idempotent. `qualifiedTable` is already escaped (`"public"."t"` or `"t"`).
 * - `key` uses the "C" collation: keys are compared byte-wise anyway, and the index is faster.
 * - `expires_at` is the lease end while in progress and created + TTL once completed, so one
 *   index serves both takeover checks and purging.
 */
export function tableDdl(qualifiedTable: string, indexName: string): string {
  return `CREATE TABLE IF NOT EXISTS ${qualifiedTable} (
  key              text COLLATE "C" PRIMARY KEY,
  fingerprint      text,
  state            text NOT NULL CHECK (state IN ('in_progress', 'completed')),
  lease_token      text,
  lease_expires_at timestamptz,
  response_status  integer,
  response_headers jsonb,
  response_body    bytea,
  created_at       timestamptz NOT NULL DEFAULT now(),
  expires_at       timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS ${escapeIdentifier(indexName, 'table')} ON ${qualifiedTable} (expires_at);
`;
}

/** The columns the store's statements use (see tableDdl). */
const COLUMNS = ['key', 'fingerprint', 'state', 'lease_token', 'lease_expires_at', 'response_status', 'response_headers', 'response_body', 'created_at', 'expires_at'];

/** A valid unique index on `a`'s column alone, no predicate or expression: what ON CONFLICT (key) infers as its arbiter. */
const ARBITER = `SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indisvalid
    AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum AND i.indpred IS NULL AND i.indexprs IS NULL`;

/**
 * The columns of table $1, and whether `key` alone has a unique index begin's ON CONFLICT (key) can
 * use: valid (a failed CREATE UNIQUE INDEX CONCURRENTLY leaves an invalid one, which ON CONFLICT
 * does not see) and not deferrable (`indimmediate`). No deferrable one may sit beside it either:
 * ON CONFLICT (key) takes every valid unique index on key as an arbiter and refuses the statement
 * when one of them is deferrable (adding a plain unique index next to a DEFERRABLE primary key,
 * the obvious answer to this refusal, used to pass here while every begin still failed).
 */
export const TABLE_SHAPE = `SELECT a.attname AS name,
  EXISTS (${ARBITER} AND i.indimmediate) AND NOT EXISTS (${ARBITER} AND NOT i.indimmediate) AS unique_alone
  FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped`;

/**
 * What is wrong with a table of the store's name that is not the store's (an app's own
 * `idempotency_keys`, a common name), or undefined when it fits: CREATE TABLE IF NOT EXISTS keeps
 * such a table, and every request would then fail at the store. Column types are not checked: a
 * migration tool's own choices (`varchar` for `key`, say) work.
 */
export function tableMismatch(rows: ReadonlyArray<{ name: string; unique_alone: boolean }>): string | undefined {
  const found = new Map(rows.map((row) => [row.name, row.unique_alone]));
  const missing = COLUMNS.filter((name) => !found.has(name));
  const problems = [missing.length > 0 ? `no column ${missing.join(', ')}` : '', found.get('key') === false ? "no unique index on key alone that begin's ON CONFLICT (key) can use (valid, not deferrable, and no deferrable one on key beside it)" : ''].filter((text) => text !== '');
  return problems.length === 0 ? undefined : problems.join('; ');
}

/** The header and body of `sql/schema.sql`: the default table, unqualified (lands in the search_path). */
export function schemaFileText(): string {
  return `-- @idemkit/postgres schema (the same DDL that store.migrate() runs).
-- For migration tools: run this once. It creates the table in the first schema of your
-- search_path; rename "idempotency_keys" (and the index) if you pass another \`table\`.
${tableDdl('"idempotency_keys"', expiresIndexName('idempotency_keys'))}`;
}

/**
 * What this role lacks to use an existing table $2 in schema $1 (by name, from the catalogs, which
 * every role may read: `to_regclass` itself fails without USAGE on the schema). `missing` lists
 * the table privileges the store's statements need (purge's `FOR UPDATE` needs UPDATE); empty
 * when the table is not there.
 */
export const TABLE_GRANTS = `SELECT current_user::text AS role, c.oid IS NOT NULL AS found,
  coalesce(has_schema_privilege(n.oid, 'USAGE'), false) AS usage,
  coalesce((SELECT string_agg(p, ', ' ORDER BY o) FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) WITH ORDINALITY AS u(p, o)
    WHERE NOT has_table_privilege(c.oid, p)), '') AS missing
  FROM (SELECT 1) AS one
  LEFT JOIN pg_namespace n ON n.nspname = $1
  LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = $2 AND c.relkind IN ('r', 'p')`;

/** The GRANT statements that would let `role` use the existing table, or undefined when none is missing. */
export function missingGrants(row: { role: string; found: boolean; usage: boolean; missing: string }, schema: string, table: string): string | undefined {
  if (!row.found) return undefined;
  const role = escapeIdentifier(row.role, 'role');
  const grants = [
    row.usage ? '' : `GRANT USAGE ON SCHEMA ${escapeIdentifier(schema, 'schema')} TO ${role};`,
    row.missing === '' ? '' : `GRANT ${row.missing} ON ${table} TO ${role};`,
  ].filter((text) => text !== '');
  return grants.length === 0 ? undefined : grants.join(' ');
}

/**
 * A fixed advisory-lock id ("idemkit" in ASCII, as a bigint). It serialises concurrent migrate()
 * calls from several app servers: CREATE TABLE IF NOT EXISTS run at the same moment by two
 * sessions can still fail on the catalog's unique index.
 */
export const MIGRATE_LOCK_ID = '29665259344849268';
