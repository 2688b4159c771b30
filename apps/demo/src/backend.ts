import { createMemoryStore, startPurger, type IdempotencyStore } from '@idemkit/core';
import { createMongoStore } from '@idemkit/mongodb';
import { createPostgresStore } from '@idemkit/postgres';
import { createRedisStore } from '@idemkit/redis';
import { Redis } from 'ioredis';
import { MongoClient } from 'mongodb';
import pg from 'pg';
import { DemoConfigError, URL_VARIABLE, type DemoConfig } from './config.js';
import { memoryOrders, mongoOrders, postgresOrders, redisOrders, type Order, type OrderRepo } from './orders.js';

export interface Backend {
  readonly store: IdempotencyStore;
  readonly orders: OrderRepo;
  /** Postgres only: the order insert and the stored response commit in one transaction. */
  readonly transactional: boolean;
  close(): Promise<void>;
}

/**
 * The idempotency store and the order list, on the same server, as a real shop would run them.
 * A server the demo cannot reach or use at startup is a DemoConfigError naming the variable, so
 * `pnpm demo` prints one line instead of a driver's stack trace (or, for Redis, starting anyway).
 */
export async function openBackend(config: DemoConfig): Promise<Backend> {
  if (config.store === 'memory') return open(config);
  const variable = URL_VARIABLE[config.store];
  try {
    return await open(config);
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    throw new DemoConfigError(`STORE=${config.store} could not start with ${variable}: ${message}. Is the server running, and is ${variable} right?`, { cause: error });
  }
}

async function open(config: DemoConfig): Promise<Backend> {
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
      let orders: OrderRepo;
      try {
        await store.migrate();
        orders = await postgresOrders(pool, ns);
      } catch (error) {
        await pool.end();
        throw error;
      }
      // Postgres has no native expiry: expired keys are deleted in batches, once a minute.
      const purger = startPurger(store);
      return { store, orders, transactional: true, close: async () => { await purger.stop(); await store.close(); await pool.end(); } };
    }
    case 'redis': {
      const redis = new Redis(config.url!, { maxRetriesPerRequest: 2, lazyConnect: true });
      // Connect now, so a wrong REDIS_URL stops the demo with the socket's error (connect() itself
      // only says "Connection is closed.") instead of serving 503s while ioredis retries forever.
      let refused: Error | undefined;
      const onError = (error: Error) => (refused ??= error);
      redis.on('error', onError);
      try {
        await redis.connect();
      } catch (error) {
        redis.disconnect();
        throw refused ?? error;
      } finally {
        redis.off('error', onError);
      }
      // From now on an outage is one line, and one more when Redis is back: without a listener,
      // ioredis prints "Unhandled error event" and a stack on every reconnect attempt.
      let down = false;
      redis.on('error', (error: Error) => {
        if (down) return;
        down = true;
        console.error(`[idemkit demo] Redis is unreachable (${error.message}); requests get 503 until it is back.`);
      });
      redis.on('ready', () => {
        if (!down) return;
        down = false;
        console.error('[idemkit demo] Redis is back.');
      });
      const store = createRedisStore({ client: redis, prefix: `${ns}:idem:` });
      return { store, orders: redisOrders(redis, ns), transactional: false, close: async () => { await store.close(); redis.disconnect(); } };
    }
    case 'mongodb': {
      const client = new MongoClient(config.url!, { serverSelectionTimeoutMS: 5_000 });
      const db = client.db();
      const store = createMongoStore({ db, collectionName: `${ns}_idempotency_keys` });
      let ttl: Awaited<ReturnType<typeof store.ensureIndexes>>;
      try {
        await client.connect();
        ttl = await store.ensureIndexes();
      } catch (error) {
        await client.close();
        throw error;
      }
      // A server without TTL indexes (FerretDB) deletes nothing by itself: purge once a minute.
      const purger = ttl === 'no-ttl' ? startPurger(store) : undefined;
      const orders = mongoOrders(db.collection<Order>(`${ns}_orders`));
      return { store, orders, transactional: false, close: async () => { await purger?.stop(); await store.close(); await client.close(); } };
    }
  }
}
