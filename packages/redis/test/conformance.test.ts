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
const prefix = uniquePrefix('redis_conformance');

runStoreConformance({
  name: 'redis',
  createStore: () => createRedisStore({ client: first, prefix }),
  // A second, independent connection: the cross-client races go through two sockets.
  createSecondStore: async () => createRedisStore({ client: await connect(), prefix }),
  nativeExpiry: true,
  cleanup: async () => {
    await deleteByPrefix(first, prefix);
    for (const client of clients) await client.quit();
    await service.stop();
  },
});
