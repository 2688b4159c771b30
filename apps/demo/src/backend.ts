import { createMemoryStore, startPurger, type IdempotencyStore } from '@idemkit/core';
import { createMongoStore } from '@idemkit/mongodb';
import { createPostgresStore } from '@idemkit/postgres';
import { createRedisStore } from '@idemkit/redis';
import { Redis } from 'ioredis';
import { MongoClient } from 'mongodb';
import pg from 'pg';
import type { DemoConfig } from './config.js';
import { memoryOrders, mongoOrders, postgresOrders, redisOrders, type Order, type OrderRepo } from './orders.js';

export interface Backend {
  readonly store: IdempotencyStore;
  readonly orders: OrderRepo;
  /** Postgres only: the order insert and the stored response commit in one transaction. */
  readonly transactional: boolean;
  close(): Promise<void>;
}

/** The idempotency store and the order list, on the same server, as a real shop would run them. */
export async function openBackend(config: DemoConfig): Promise<Backend> {
  const ns = config.namespace;
  switch (config.store) {
    case 'memory': {
      const store = createMemoryStore();
      return { store, orders: memoryOrders(), transactional: false, close: () => store.close() };
    }
    case 'postgres': {
      const pool = new pg.Pool({ connectionString: config.url, max: 20 });
      // An idle connection the server drops (restart, failover) emits 'error' on the pool; without a
      // listener Node ends the process. The pool replaces the connection on the next query.
      pool.on('error', (error) => console.error('[idemkit demo] Postgres dropped an idle connection:', error.message));
      const store = createPostgresStore({ pool, table: `${ns}_idempotency_keys` });
      await store.migrate();
      const orders = await postgresOrders(pool, ns);
      // Postgres has no native expiry: expired keys are deleted in batches, once a minute.
      const purger = startPurger(store);
      return { store, orders, transactional: true, close: async () => { await purger.stop(); await store.close(); await pool.end(); } };
    }
    case 'redis': {
      const redis = new Redis(config.url!, { maxRetriesPerRequest: 2 });
      const store = createRedisStore({ client: redis, prefix: `${ns}:idem:` });
      return { store, orders: redisOrders(redis, ns), transactional: false, close: async () => { await store.close(); redis.disconnect(); } };
    }
    case 'mongodb': {
      const client = new MongoClient(config.url!, { serverSelectionTimeoutMS: 5_000 });
      await client.connect();
      const db = client.db();
      const store = createMongoStore({ db, collectionName: `${ns}_idempotency_keys` });
      // A server without TTL indexes (FerretDB) deletes nothing by itself: purge once a minute.
      const purger = (await store.ensureIndexes()) === 'no-ttl' ? startPurger(store) : undefined;
      const orders = mongoOrders(db.collection<Order>(`${ns}_orders`));
      return { store, orders, transactional: false, close: async () => { await purger?.stop(); await store.close(); await client.close(); } };
    }
  }
}
