import { resolvePostgres } from '@idemkit/test-services';
import pg from 'pg';
import { describe, expect, it } from 'vitest';
import { postgresOrders } from '../src/orders.js';

describe('the demo orders table on Postgres', () => {
  it('processes creating it at once all start (CREATE TABLE IF NOT EXISTS races on the row type)', async () => {
    const service = await resolvePostgres();
    const pool = new pg.Pool({ connectionString: service.value, max: 8 });
    const namespaces: string[] = [];
    try {
      for (let round = 0; round < 20; round++) {
        const ns = `race_${Math.random().toString(36).slice(2, 10)}`;
        namespaces.push(ns);
        // Before: now and then one of them rejected with 42710 (type "…_orders" already exists).
        const results = await Promise.allSettled(Array.from({ length: 8 }, () => postgresOrders(pool, ns)));
        expect(results.filter((r) => r.status === 'rejected')).toEqual([]);
      }
    } finally {
      for (const ns of namespaces) await pool.query(`DROP TABLE IF EXISTS ${ns}_orders`);
      await pool.end();
    }
  }, 60_000);
});
