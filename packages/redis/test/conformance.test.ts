import { runStoreConformance } from '@idemkit/store-conformance';
import type { Redis } from 'ioredis';
import { createRedisStore } from '../src/index.js';
import { deleteByPrefix, redisClient, redisService, uniquePrefix } from './services.js';

// Top-level await: the suite registers its tests synchronously, so the clients exist first.
const service = await redisService();
const clients: Redis[] = [];
const connect = async (): Promise<Redis> => {
  const client = await redisClient(service.value);
  clients.push(client);
  return client;
};
const first = await connect();
let open = 2;

// Both ways of claiming a key. With `claim: 'script'` the second store claims with SET, so the
// cross-client races also prove that the two modes agree on one key (a config rollout).
for (const claim of ['set', 'script'] as const) {
  const prefix = uniquePrefix(`redis_conformance_${claim}`);
  runStoreConformance({
    name: claim === 'set' ? 'redis' : "redis (claim: 'script')",
    createStore: () => createRedisStore({ client: first, prefix, claim }),
    // A second, independent connection: the cross-client races go through two sockets.
    createSecondStore: async () => createRedisStore({ client: await connect(), prefix }),
    nativeExpiry: true,
    cleanup: async () => {
      await deleteByPrefix(first, prefix);
      if (--open > 0) return;
      for (const client of clients) await client.quit();
      await service.stop();
    },
  });
}
