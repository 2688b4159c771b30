import { createMemoryStore, type IdempotencyStore } from '@idemkit/core';
import { createMongoStore } from '@idemkit/mongodb';
import { createPostgresStore } from '@idemkit/postgres';
import { createRedisStore } from '@idemkit/redis';
import {
  isolatedPostgresSchema,
  resolveMongo,
  resolvePostgres,
  resolveRedis,
  resolveRedisCluster,
  uniqueMongoDbName,
  uniquePrefix,
} from '@idemkit/test-services';
import { Cluster, Redis } from 'ioredis';
import { MongoClient } from 'mongodb';
import pg from 'pg';

/** The stores every binding is tested against (SPEC §4). */
export const STORE_NAMES = ['memory', 'postgres', 'redis', 'redis-cluster', 'mongodb'] as const;
export type StoreName = (typeof STORE_NAMES)[number];

/** One store kind, opened once per suite run. Every factory call is in this file, so wiring is one place. */
export interface StoreHarness {
  readonly name: StoreName;
  /** The store under test. Cases share it; each case uses its own random keys. */
  readonly store: IdempotencyStore;
  /**
   * A second store of the same kind whose connection is then ended (for the memory store: a
   * wrapper whose every method rejects), so every call fails: the fail-closed / pass policy under test.
   */
  broken(): Promise<IdempotencyStore>;
  /** Postgres only: a pool on the run's own schema, for the transactional case's business table. */
  readonly pg?: { readonly pool: pg.Pool; readonly schema: string };
  close(): Promise<void>;
}

const suiteName = 'http_suite';

/** Every method rejects, as a store whose server is gone would. */
function rejectingStore(): IdempotencyStore {
  const fail = (): Promise<never> => Promise.reject(new Error('store is down (http-suite failure case)'));
  return {
    shared: true,
    begin: fail,
    complete: fail,
    release: fail,
    renew: fail,
    get: fail,
    purgeExpired: fail,
    close: async () => {},
  };
}

async function openMemory(): Promise<StoreHarness> {
  const store = createMemoryStore();
  return {
    name: 'memory',
    store,
    broken: async () => rejectingStore(),
    close: () => store.close(),
  };
}

async function openPostgres(): Promise<StoreHarness> {
  const service = await resolvePostgres();
  const isolated = await isolatedPostgresSchema(service.value, suiteName);
  const pool = new pg.Pool({ connectionString: isolated.url, max: 20 });
  const store = createPostgresStore({ pool, schema: isolated.schema });
  await store.migrate();
  return {
    name: 'postgres',
    store,
    pg: { pool, schema: isolated.schema },
    broken: async () => {
      const own = new pg.Pool({ connectionString: isolated.url, max: 2 });
      const dead = createPostgresStore({ pool: own, schema: isolated.schema });
      await own.query('SELECT 1');
      await own.end();
      return dead;
    },
    close: async () => {
      await store.close();
      await pool.end();
      await isolated.drop();
      await service.stop();
    },
  };
}

async function openRedis(): Promise<StoreHarness> {
  const service = await resolveRedis();
  const client = new Redis(service.value);
  await client.ping();
  const prefix = uniquePrefix(suiteName);
  const store = createRedisStore({ client, prefix });
  return {
    name: 'redis',
    store,
    broken: async () => {
      // No offline queue and no reconnect: once quit, every command rejects at once.
      const own = new Redis(service.value, {
        lazyConnect: true,
        enableOfflineQueue: false,
        maxRetriesPerRequest: 0,
        retryStrategy: () => null,
      });
      await own.connect();
      const dead = createRedisStore({ client: own, prefix });
      await own.quit();
      return dead;
    },
    close: async () => {
      await cleanRedis(client, prefix);
      await store.close();
      await client.quit();
      await service.stop();
    },
  };
}

async function openRedisCluster(): Promise<StoreHarness> {
  const service = await resolveRedisCluster();
  const nodes = service.value.map(({ host, port }) => ({ host, port }));
  const client = new Cluster(nodes);
  await client.ping();
  const prefix = uniquePrefix(suiteName);
  const store = createRedisStore({ client, prefix });
  return {
    name: 'redis-cluster',
    store,
    broken: async () => {
      const own = new Cluster(nodes, { lazyConnect: true, enableOfflineQueue: false, clusterRetryStrategy: () => null });
      await own.connect();
      const dead = createRedisStore({ client: own, prefix });
      await own.quit();
      return dead;
    },
    close: async () => {
      await Promise.all(client.nodes('master').map((node) => cleanRedis(node, prefix)));
      await store.close();
      await client.quit();
      await service.stop();
    },
  };
}

/** Deletes this run's keys (SCAN, never KEYS), so a shared server does not fill up. */
async function cleanRedis(client: Redis, prefix: string): Promise<void> {
  let cursor = '0';
  do {
    const [next, keys] = await client.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 500);
    cursor = next;
    for (const key of keys) await client.del(key);
  } while (cursor !== '0');
}

async function openMongo(): Promise<StoreHarness> {
  const service = await resolveMongo();
  const client = new MongoClient(service.value, { serverSelectionTimeoutMS: 5_000 });
  await client.connect();
  const db = client.db(uniqueMongoDbName(suiteName));
  const store = createMongoStore({ db, logger: false });
  await store.ensureIndexes();
  return {
    name: 'mongodb',
    store,
    broken: async () => {
      // Its own client, closed: the driver then rejects every operation (MongoNotConnectedError).
      const own = new MongoClient(service.value, { serverSelectionTimeoutMS: 1_000 });
      await own.connect();
      const dead = createMongoStore({ db: own.db(db.databaseName), logger: false });
      await own.close();
      return dead;
    },
    close: async () => {
      await store.close();
      await db.dropDatabase();
      await client.close();
      await service.stop();
    },
  };
}

const OPENERS: Record<StoreName, () => Promise<StoreHarness>> = {
  memory: openMemory,
  postgres: openPostgres,
  redis: openRedis,
  'redis-cluster': openRedisCluster,
  mongodb: openMongo,
};

/** Opens one store kind against its real server (resolved from TEST_* variables; a missing one throws). */
export function openStore(name: StoreName): Promise<StoreHarness> {
  return OPENERS[name]();
}
