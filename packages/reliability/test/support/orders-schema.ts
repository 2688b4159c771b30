import { createPostgresStore, type PostgresStore } from '@idemkit/postgres';
import pg from 'pg';
import { afterAll, beforeAll } from 'vitest';
import { namespace, serviceUrl } from '../../src/services.js';

/** A file's own schema on the shared Postgres: an `orders` table the handlers write to, and a migrated store. */
export interface OrdersSchema {
  readonly store: PostgresStore;
  /** The quoted `orders` table (one `ref` text column). */
  readonly rows: string;
  /** Rows of `orders` with this `ref`. */
  count(ref: string): Promise<number>;
}

/** Made before the file's tests and dropped after them (call at the top level of a test file). */
export function ordersSchema(prefix: string): OrdersSchema {
  const schema = namespace(prefix);
  const rows = `"${schema}"."orders"`;
  let pool: pg.Pool | undefined;
  let store: PostgresStore | undefined;

  beforeAll(async () => {
    pool = new pg.Pool({ connectionString: await serviceUrl('postgres'), max: 10 });
    pool.on('error', () => undefined);
    await pool.query(`CREATE SCHEMA "${schema}"`);
    await pool.query(`CREATE TABLE ${rows} (ref text NOT NULL)`);
    store = createPostgresStore({ pool, schema });
    await store.migrate();
  });

  afterAll(async () => {
    await pool?.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    await pool?.end();
  });

  const ready = (): pg.Pool => {
    if (pool === undefined) throw new Error('ordersSchema(): used before its beforeAll ran');
    return pool;
  };
  return {
    get store() {
      ready();
      return store!;
    },
    rows,
    count: async (ref) => Number((await ready().query<{ n: string }>(`SELECT count(*) AS n FROM ${rows} WHERE ref = $1`, [ref])).rows[0]?.n),
  };
}
