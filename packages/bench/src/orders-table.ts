import type { ServiceEnv } from './config.js';

/** The `postgres` handler's table, created before the servers start and dropped at the end. */
export interface OrdersTable {
  drop(): Promise<void>;
}

/** Created here, once, because servers creating it concurrently race in Postgres's catalog. */
export async function ordersTableFor(env: ServiceEnv, table: string): Promise<OrdersTable> {
  if (!env.postgres) throw new Error('--handler=postgres needs TEST_POSTGRES_URL');
  const { default: pg } = await import('pg');
  const client = new pg.Client({ connectionString: env.postgres });
  await client.connect();
  try {
    await client.query(`CREATE TABLE ${table} (id bigserial PRIMARY KEY, sku text NOT NULL, qty integer NOT NULL, created_at timestamptz NOT NULL DEFAULT now())`);
  } finally {
    await client.end();
  }
  return {
    drop: async () => {
      const dropper = new pg.Client({ connectionString: env.postgres });
      await dropper.connect();
      try {
        await dropper.query(`DROP TABLE IF EXISTS ${table}`);
      } finally {
        await dropper.end();
      }
    },
  };
}
