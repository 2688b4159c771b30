import type { ServiceEnv } from './config.js';

/** The `postgres` handler's table, created before the servers start and dropped at the end. */
export interface OrdersTable {
  drop(): Promise<void>;
}

/** Created here, once, because servers creating it concurrently race in Postgres's catalog. */
export async function ordersTableFor(env: ServiceEnv, table: string): Promise<OrdersTable> {
  const url = env.postgres;
  if (!url) throw new Error('--handler=postgres needs TEST_POSTGRES_URL');
  const { default: pg } = await import('pg');
  // One statement on a connection of its own: the runner holds none between the two.
  const run = async (sql: string): Promise<void> => {
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    try {
      await client.query(sql);
    } finally {
      await client.end();
    }
  };
  await run(`CREATE TABLE ${table} (id bigserial PRIMARY KEY, sku text NOT NULL, qty integer NOT NULL, created_at timestamptz NOT NULL DEFAULT now())`);
  return { drop: () => run(`DROP TABLE IF EXISTS ${table}`) };
}
