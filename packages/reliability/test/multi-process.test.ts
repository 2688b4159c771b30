/**
 * Issue 10.1: several processes, one store. Three demo processes (Fastify, Express, Koa) share one
 * Redis, then one Postgres, then the MongoDB wire server; 600 requests over 60 keys, every key
 * sent to all three at once and retried by @idemkit/client.
 */
import { createIdempotentFetch } from '@idemkit/client';
import { afterAll, describe, expect, it } from 'vitest';
import { countRecords, dropNamespace, location, type StoreKind } from '../src/records.js';
import { namespace, serviceUrl } from '../src/services.js';
import { DEMO, ProcessPool } from '../src/spawn.js';

const KEYS = 60;
const PER_KEY = 10; // 600 requests
const pool = new ProcessPool();
afterAll(() => pool.stopAll());

const stores = [
  ['redis', 'REDIS_URL'],
  ['postgres', 'DATABASE_URL'],
  ['mongodb', 'MONGODB_URL'],
] as const;

describe.each(stores)('three demo processes on one %s', (store, variable) => {
  it(`${KEYS * PER_KEY} requests over ${KEYS} keys, each key on all three at once: exactly ${KEYS} orders, one answer per key`, async () => {
    const url = await serviceUrl(store as StoreKind);
    const ns = namespace(`mp_${store}`);
    const env = { STORE: store, [variable]: url, DEMO_NAMESPACE: ns, DEMO_WORK_MS: '30' };
    const demos = await Promise.all(['fastify', 'express', 'koa'].map((FRAMEWORK) => pool.spawn(DEMO, { ...env, FRAMEWORK })));
    try {
      const fetchSafe = createIdempotentFetch({ baseDelayMs: 20, maxDelayMs: 250, maxAttempts: 60, deadlineMs: 45_000 });
      const answers = await Promise.all(
        Array.from({ length: KEYS }, (_, k) =>
          Promise.all(
            Array.from({ length: PER_KEY }, async (_, r) => {
              const demo = demos[(k + r) % demos.length]!;
              const res = await fetchSafe(`${demo.url}/orders`, {
                method: 'POST',
                headers: { 'content-type': 'application/json' },
                body: JSON.stringify({ item: `item-${k}`, amount: 100 + k }),
                idempotencyKey: `${ns}-key-${k}`,
              });
              return { status: res.status, body: await res.text(), location: res.headers.get('location') };
            }),
          ),
        ),
      );

      for (const perKey of answers) {
        expect(perKey.map((a) => a.status)).toEqual(Array(PER_KEY).fill(201));
        expect(new Set(perKey.map((a) => a.body)).size).toBe(1);
        expect(new Set(perKey.map((a) => a.location)).size).toBe(1);
      }
      const { orders } = (await (await fetch(`${demos[0]!.url}/orders`)).json()) as { orders: Array<{ key: string; id: string }> };
      const mine = orders.filter((o) => o.key?.startsWith(ns));
      expect(mine).toHaveLength(KEYS);
      expect(new Set(mine.map((o) => o.key)).size).toBe(KEYS);
      // Each key's single order is the one every answer for that key names.
      const byKey = new Map(mine.map((o) => [o.key, o.id]));
      answers.forEach((perKey, k) => expect((JSON.parse(perKey[0]!.body) as { id: string }).id).toBe(byKey.get(`${ns}-key-${k}`)));

      const records = await countRecords(store as StoreKind, url, location(store as StoreKind, ns, 'demo'));
      expect(records).toMatchObject({ total: KEYS, completed: KEYS, inProgress: 0 });
    } finally {
      await Promise.all(demos.map((d) => d.stop()));
      await dropNamespace(store as StoreKind, url, [`${ns}_orders`, `${ns}_idempotency_keys`], `${ns}:`);
    }
  });
});
