// Drivers are imported where they are used, so a server loads only its own store's code (and a
// CPU profile of the memory store shows no module loading of pg, ioredis or mongodb).
import type { IdempotencyStore } from '@idemkit/core';
import type { Cluster, Redis } from 'ioredis';
import type { ServiceEnv, StoreName } from './config.js';

/** A store plus a count of the round trips its driver made, as the driver saw them. */
export interface CountedStore {
  readonly store: IdempotencyStore;
  /** Round trips (statements, commands) sent since the store was opened. */
  roundTrips(): number;
  /** Closes the store and the client it was given, and removes what the run wrote. */
  close(): Promise<void>;
}

/** Every Redis command ioredis sends, EVALSHA retries as EVAL included, goes through sendCommand. */
function countCommands(client: Redis | Cluster): () => number {
  let count = 0;
  const send = client.sendCommand.bind(client) as (...args: unknown[]) => unknown;
  (client as unknown as { sendCommand: (...args: unknown[]) => unknown }).sendCommand = (...args: unknown[]) => {
    count++;
    return send(...args);
  };
  return () => count;
}

/** Deletes a run's keys (SCAN + UNLINK) so a bench leaves nothing in a shared Redis. */
export async function deleteRedisPrefix(client: Redis, prefix: string): Promise<number> {
  let cursor = '0';
  let deleted = 0;
  do {
    const [next, keys] = await client.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000);
    cursor = next;
    // One UNLINK per key (pipelined): a Cluster node refuses multi-key commands across slots.
    if (keys.length > 0) {
      const pipeline = client.pipeline();
      for (const key of keys) pipeline.unlink(key);
      for (const [error, count] of (await pipeline.exec()) ?? []) if (!error) deleted += Number(count);
    }
  } while (cursor !== '0');
  return deleted;
}

export function clusterNodes(list: string): Array<{ host: string; port: number }> {
  return list.split(',').map((entry) => {
    const [host = '127.0.0.1', port = '6379'] = entry.trim().split(':');
    return { host, port: Number(port) };
  });
}

/**
 * Opens one of the benchmarked stores the way a user would, with its driver instrumented to
 * count round trips. `runId` keeps this run's schema, key prefix or database apart from others.
 */
export async function openStore(name: StoreName, env: ServiceEnv, runId: string, poolSize = 32): Promise<CountedStore> {
  switch (name) {
    case 'memory': {
      const { createMemoryStore } = await import('@idemkit/core');
      // Experiments only (see README): the default bound is what users get.
      const maxEntries = Number(process.env['IDEMKIT_BENCH_MEMORY_MAX_ENTRIES']) || undefined;
      return { store: createMemoryStore(maxEntries ? { maxEntries } : undefined), roundTrips: () => 0, close: async () => undefined };
    }
    case 'postgres': {
      const [{ default: pg }, { createPostgresStore }] = await Promise.all([import('pg'), import('@idemkit/postgres')]);
      const url = required(env.postgres, 'TEST_POSTGRES_URL');
      let statements = 0;
      const pool = new pg.Pool({ connectionString: url, max: poolSize });
      // Each statement a client sends is one round trip (the store never pipelines).
      pool.on('connect', (client) => {
        const query = client.query.bind(client) as (...args: unknown[]) => unknown;
        (client as unknown as { query: (...args: unknown[]) => unknown }).query = (...args: unknown[]) => {
          statements++;
          return query(...args);
        };
      });
      const schema = `idemkit_bench_${runId}`;
      const store = createPostgresStore({ pool, schema });
      await store.migrate();
      return {
        store,
        roundTrips: () => statements,
        close: async () => {
          try {
            await store.close();
            await pool.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
          } finally {
            await pool.end();
          }
        },
      };
    }
    case 'redis': {
      const [{ Redis }, { createRedisStore }] = await Promise.all([import('ioredis'), import('@idemkit/redis')]);
      // Experiments only (see README): batch the commands of one tick into one socket write.
      const enableAutoPipelining = process.env['IDEMKIT_BENCH_REDIS_AUTOPIPELINING'] === '1';
      const client = new Redis(required(env.redis, 'TEST_REDIS_URL'), { enableAutoPipelining });
      const prefix = `idemkit-bench:${runId}:`;
      const store = createRedisStore({ client, prefix });
      const roundTrips = countCommands(client);
      return {
        store,
        roundTrips,
        close: async () => {
          try {
            await store.close();
            await deleteRedisPrefix(client, prefix);
          } finally {
            await client.quit();
          }
        },
      };
    }
    case 'redis-cluster': {
      const [{ Cluster }, { createRedisStore }] = await Promise.all([import('ioredis'), import('@idemkit/redis')]);
      const cluster = new Cluster(clusterNodes(required(env.redisCluster, 'TEST_REDIS_CLUSTER_NODES')));
      await cluster.ping(); // slot map loaded before counting starts
      const prefix = `idemkit-bench:${runId}:`;
      const store = createRedisStore({ client: cluster, prefix });
      const roundTrips = countCommands(cluster);
      return {
        store,
        roundTrips,
        close: async () => {
          try {
            await store.close();
            await Promise.all(cluster.nodes('master').map((node) => deleteRedisPrefix(node, prefix)));
          } finally {
            await cluster.quit();
          }
        },
      };
    }
    case 'mongodb': {
      const [{ MongoClient }, { createMongoStore }] = await Promise.all([import('mongodb'), import('@idemkit/mongodb')]);
      // Command monitoring reports every command the driver sends, one round trip each.
      const client = new MongoClient(required(env.mongodb, 'TEST_MONGODB_URL'), { monitorCommands: true, maxPoolSize: poolSize });
      let commands = 0;
      client.on('commandStarted', () => {
        commands++;
      });
      await client.connect();
      const db = client.db(`idemkit_bench_${runId}`);
      const store = createMongoStore({ db, logger: false });
      await store.ensureIndexes();
      return {
        store,
        roundTrips: () => commands,
        close: async () => {
          try {
            await store.close();
            await db.dropDatabase();
          } finally {
            await client.close();
          }
        },
      };
    }
  }
}

function required(value: string | undefined, name: string): string {
  if (!value) throw new Error(`${name} is not set: the bench needs this service (see scripts/services.sh).`);
  return value;
}
