import { resolvePostgres } from '@idemkit/test-services';
import pg from 'pg';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { FRAMEWORKS, readConfig } from '../src/config.js';
import { startDemo } from '../src/server.js';

const admin: { pool?: pg.Pool } = {};
const namespaces: string[] = [];
afterAll(async () => {
  for (const ns of namespaces) await admin.pool?.query(`DROP TABLE IF EXISTS ${ns}_orders, ${ns}_idempotency_keys`);
  await admin.pool?.end();
});

// A handler that throws (here: the orders table is gone, on a real Postgres). Before: Fastify
// answered the 500 problem but logged nothing (its logger is off, so app.log.error was a no-op),
// and Koa answered Koa's text/plain "Internal Server Error" instead of the problem the others send.
describe.each(FRAMEWORKS)('the demo on %s when the order cannot be written', (framework) => {
  it('answers a 500 problem+json, logs the error, and a retry with the key runs again', async () => {
    const service = await resolvePostgres();
    admin.pool ??= new pg.Pool({ connectionString: service.value, max: 2 });
    const ns = `err_${framework}_${Math.random().toString(36).slice(2, 8)}`;
    namespaces.push(ns);
    const demo = await startDemo(readConfig({ FRAMEWORK: framework, PORT: '0', DEMO_WORK_MS: '0', STORE: 'postgres', DATABASE_URL: service.value, DEMO_NAMESPACE: ns }));
    const logged = vi.spyOn(console, 'error').mockImplementation(() => undefined);
    try {
      await admin.pool.query(`DROP TABLE ${ns}_orders`);
      const key = crypto.randomUUID();
      const order = () => fetch(`${demo.url}/orders`, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': key }, body: '{"item":"cup","amount":300}' });

      const res = await order();
      expect(res.status).toBe(500);
      expect(res.headers.get('content-type')).toContain('application/problem+json');
      expect(await res.json()).toMatchObject({ type: 'https://idemkit.dev/demo/problems/internal', status: 500 });
      expect(logged.mock.calls.flat().map(String).join('\n')).toContain(`relation "${ns}_orders" does not exist`);

      // The key was freed: once the table is back, the retry places the order.
      await admin.pool.query(`CREATE TABLE ${ns}_orders (id text PRIMARY KEY, item text NOT NULL, amount integer NOT NULL, idem_key text, created_at timestamptz NOT NULL DEFAULT now())`);
      const retry = await order();
      expect(retry.status).toBe(201);
      expect(retry.headers.get('idempotent-replayed')).toBeNull();
    } finally {
      logged.mockRestore();
      await demo.close();
    }
  });
});
