// The peer range says ioredis ^5.3 || ^6: run the conformance suite on an ioredis 6 client too
// (installed as the `ioredis6` alias), plus the Cluster client of ioredis 6.
import { runStoreConformance } from '@idemkit/store-conformance';
import { resolveRedisCluster } from '@idemkit/test-services';
import { Cluster as Cluster6, Redis as Redis6 } from 'ioredis6';
import { describe, expect, it } from 'vitest';
import { createRedisStore, type RedisClient } from '../src/index.js';
import { deleteByPrefix, redisService, uniquePrefix } from './services.js';

// Within this repo `ioredis` types are v5; a user on v6 gets v6 types from their own install.
const asClient = (c: Redis6 | Cluster6): RedisClient => c as unknown as RedisClient;

const service = await redisService();
const clients: Redis6[] = [];
const connect = async (): Promise<Redis6> => {
  const client = new Redis6(service.value);
  await client.ping();
  clients.push(client);
  return client;
};
const first = await connect();
const prefix = uniquePrefix('redis_ioredis6');

runStoreConformance({
  name: 'redis (ioredis 6)',
  createStore: () => createRedisStore({ client: asClient(first), prefix }),
  createSecondStore: async () => createRedisStore({ client: asClient(await connect()), prefix }),
  nativeExpiry: true,
  cleanup: async () => {
    await deleteByPrefix(asClient(first), prefix);
    for (const client of clients) await client.quit();
    await service.stop();
  },
});

describe('ioredis 6 Cluster client', () => {
  it('begin → complete → replay across two Cluster clients', async () => {
    const cluster = await resolveRedisCluster();
    const nodes = cluster.value.map(({ host, port }) => ({ host, port }));
    const a = new Cluster6(nodes);
    const b = new Cluster6(nodes);
    try {
      const sa = createRedisStore({ client: asClient(a), prefix });
      const sb = createRedisStore({ client: asClient(b), prefix });
      for (let i = 0; i < 20; i++) {
        const key = `c6:${i}`;
        const r = await sa.begin(key, 'fp', 60_000);
        if (r.kind !== 'acquired') throw new Error('expected acquired');
        const body = new Uint8Array([0, 255, i]);
        expect(await sa.complete(key, r.token, { status: 200, headers: [['x', String(i)]], body }, 60_000)).toBe(true);
        const replay = await sb.begin(key, 'fp', 60_000);
        expect(replay.kind).toBe('existing');
        if (replay.kind === 'existing') expect(Array.from(replay.record.response?.body ?? [])).toEqual([0, 255, i]);
      }
      await deleteByPrefix(asClient(a), prefix);
    } finally {
      await a.quit();
      await b.quit();
      await cluster.stop();
    }
  });
});
