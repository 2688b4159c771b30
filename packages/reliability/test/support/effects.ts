import pg from 'pg';
import { serviceUrl } from '../../src/services.js';

/**
 * The job workers' side effect: a charge row in `"<ns>_effects"` on Postgres (see
 * src/job-worker.ts), a table the test that spawns them makes first.
 */
export async function createEffects(ns: string, max = 2): Promise<pg.Pool> {
  const effects = new pg.Pool({ connectionString: await serviceUrl('postgres'), max });
  await effects.query(`CREATE TABLE "${ns}_effects" (id serial PRIMARY KEY, order_id text NOT NULL, charge_id text NOT NULL, pid int NOT NULL)`);
  return effects;
}

/** Drop the table and end its pool (`undefined` when setup failed before making them). */
export async function dropEffects(effects: pg.Pool | undefined, ns: string): Promise<void> {
  await effects?.query(`DROP TABLE IF EXISTS "${ns}_effects"`);
  await effects?.end();
}
