import { randomUUID } from 'node:crypto';
import { resolvePostgres } from '@idemkit/test-services';
import pg from 'pg';

/** The real server for this run (TEST_POSTGRES_URL, else Testcontainers, else a loud failure). */
export async function postgresUrl(): Promise<string> {
  const service = await resolvePostgres();
  return service.value;
}

export interface TestSchema {
  readonly url: string;
  /** A pool for the test's own assertions and as the store's injected pool. */
  readonly pool: pg.Pool;
  /** A fresh schema name, dropped by `drop()`. */
  readonly schema: string;
  /** `"schema"."table"` helper for assertions. */
  table(name?: string): string;
  drop(): Promise<void>;
}

/**
 * Prefix of every schema (and role) the tests create: `IDEMKIT_TEST_SCHEMA_PREFIX` when set, so
 * runs that share one server can keep to names of their own.
 */
export const TEST_PREFIX = process.env.IDEMKIT_TEST_SCHEMA_PREFIX ?? 'idemkit_t_';

/** One schema per test file, so files run in parallel against one database. */
export async function openSchema(max = 20): Promise<TestSchema> {
  const url = await postgresUrl();
  const pool = new pg.Pool({ connectionString: url, max });
  // Backends terminated by the failure tests surface here when idle; the tests assert on queries.
  pool.on('error', () => undefined);
  const schema = `${TEST_PREFIX}${randomUUID().replaceAll('-', '').slice(0, 16)}`;
  await pool.query(`CREATE SCHEMA "${schema}"`);
  return {
    url,
    pool,
    schema,
    table: (name = 'idempotency_keys') => `"${schema}"."${name}"`,
    async drop() {
      await pool.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
      await pool.end();
    },
  };
}

export const bytes = (text: string): Uint8Array => new TextEncoder().encode(text);

/**
 * Every connection `pool` opens while `readOnly()` says so is read-only, as one to a demoted
 * primary or a standby is (a failover behind one address, the pool keeping what it opened).
 */
export function opensReadOnlyWhile(pool: pg.Pool, readOnly: () => boolean): void {
  pool.on('connect', (client) => {
    if (readOnly()) void client.query('SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY').catch(() => undefined);
  });
}
