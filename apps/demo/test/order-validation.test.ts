import { resolvePostgres } from '@idemkit/test-services';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readConfig } from '../src/config.js';
import { startDemo, type RunningDemo } from '../src/server.js';

// Orders the README called valid ("item": a non-empty string, "amount": a positive integer) that
// the Postgres backend cannot store. Before: a 500 on Postgres (integer out of range, NUL in
// text) and a 201 elsewhere; a lone surrogate was answered as sent but listed as U+FFFD.
describe('the demo on Postgres: every order it accepts, it stores as answered', () => {
  let demo: RunningDemo;
  let admin: pg.Pool;
  const ns = `val_${Math.random().toString(36).slice(2, 8)}`;
  beforeAll(async () => {
    const service = await resolvePostgres();
    admin = new pg.Pool({ connectionString: service.value, max: 1 });
    demo = await startDemo(readConfig({ PORT: '0', DEMO_WORK_MS: '0', STORE: 'postgres', DATABASE_URL: service.value, DEMO_NAMESPACE: ns }));
  });
  afterAll(async () => {
    await demo?.close();
    await admin?.query(`DROP TABLE IF EXISTS ${ns}_orders, ${ns}_idempotency_keys`);
    await admin?.end();
  });

  const order = (body: unknown) =>
    fetch(`${demo.url}/orders`, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': crypto.randomUUID() }, body: JSON.stringify(body) });

  it.each([
    ['an amount over 2^31 - 1', { item: 'car', amount: 2_147_483_648 }],
    ['a NUL in the item', { item: 'a\u0000b', amount: 100 }],
    ['a lone surrogate in the item', { item: 'a\ud800b', amount: 100 }],
  ])('%s: 400 invalid-order (and nothing stored: see the last test)', async (_case, body) => {
    const res = await order(body);
    expect(res.status).toBe(400);
    expect(await res.json()).toMatchObject({ type: 'https://idemkit.dev/demo/problems/invalid-order', status: 400 });
  });

  it('the largest amount and a non-BMP item are stored exactly as answered, and they are the only order', async () => {
    const res = await order({ item: 'beans ☕ 🫘', amount: 2_147_483_647 });
    expect(res.status).toBe(201);
    const created = (await res.json()) as { id: string };
    const { orders } = (await (await fetch(`${demo.url}/orders`)).json()) as { orders: Array<{ id: string }> };
    expect(orders).toEqual([created]);
  });
});
