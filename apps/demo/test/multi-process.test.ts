import { createIdempotentFetch } from '@idemkit/client';
import { resolveMongo, resolvePostgres, resolveRedis } from '@idemkit/test-services';
import { Redis } from 'ioredis';
import { MongoClient } from 'mongodb';
import pg from 'pg';
import { afterAll, describe, expect, it } from 'vitest';
import { spawnDemo, type DemoProcess } from './processes.js';

const running: DemoProcess[] = [];
afterAll(async () => {
  await Promise.all(running.splice(0).map((p) => p.stop()));
});

const backends = [
  ['redis', 'REDIS_URL', resolveRedis],
  ['postgres', 'DATABASE_URL', resolvePostgres],
  ['mongodb', 'MONGODB_URL', resolveMongo],
] as const;

describe.each(backends)('three demo processes on one %s behave as one service', (store, variable, resolve) => {
  it('20 keys, each sent to all three processes at once and retried: exactly 20 orders, identical answers per key', async () => {
    const service = await resolve();
    const namespace = `mp_${store}_${Math.random().toString(36).slice(2, 8)}`;
    const env = { STORE: store, [variable]: service.value, DEMO_NAMESPACE: namespace, DEMO_WORK_MS: '40' };
    const demos = await Promise.all(['fastify', 'express', 'koa'].map((FRAMEWORK) => spawnDemo({ ...env, FRAMEWORK })));
    running.push(...demos);

    const fetchSafe = createIdempotentFetch({ baseDelayMs: 20, maxDelayMs: 200, maxAttempts: 40 });
    const keys = Array.from({ length: 20 }, (_, i) => `${namespace}-key-${i}`);
    const answers = await Promise.all(
      keys.map((key, i) =>
        Promise.all(
          demos.map(async (demo) => {
            const res = await fetchSafe(`${demo.url}/orders`, {
              method: 'POST',
              headers: { 'content-type': 'application/json' },
              body: JSON.stringify({ item: `item-${i}`, amount: 100 + i }),
              idempotencyKey: key,
            });
            return { status: res.status, body: await res.text(), location: res.headers.get('location') };
          }),
        ),
      ),
    );
    for (const perKey of answers) {
      expect(perKey.map((a) => a.status)).toEqual([201, 201, 201]);
      expect(new Set(perKey.map((a) => a.body)).size).toBe(1);
      expect(new Set(perKey.map((a) => a.location)).size).toBe(1);
    }
    // Each process finds every order at its Location, whichever process created it.
    for (const [i, demo] of demos.entries()) {
      const { body, location } = answers[i]![0]!;
      const located = await fetch(new URL(location!, demo.url));
      expect(located.status).toBe(200);
      expect(await located.json()).toEqual(JSON.parse(body));
    }
    const { orders } = (await (await fetch(`${demos[0]!.url}/orders`)).json()) as { orders: Array<{ key: string }> };
    const mine = orders.filter((o) => o.key?.startsWith(namespace));
    expect(mine).toHaveLength(20);
    expect(new Set(mine.map((o) => o.key)).size).toBe(20);
    await Promise.all(demos.map((d) => d.stop()));
    await dropNamespace(store, service.value, namespace);
  });
});

/** Leave nothing behind on the shared servers. */
async function dropNamespace(store: (typeof backends)[number][0], url: string, ns: string): Promise<void> {
  if (store === 'postgres') {
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    await client.query(`DROP TABLE IF EXISTS ${ns}_orders, ${ns}_idempotency_keys`);
    await client.end();
  } else if (store === 'redis') {
    const redis = new Redis(url);
    const keys = await redis.keys(`${ns}:*`);
    if (keys.length > 0) await redis.del(...keys);
    redis.disconnect();
  } else {
    const client = await MongoClient.connect(url);
    await client.db().collection(`${ns}_orders`).drop().catch(() => undefined);
    await client.db().collection(`${ns}_idempotency_keys`).drop().catch(() => undefined);
    await client.close();
  }
}
