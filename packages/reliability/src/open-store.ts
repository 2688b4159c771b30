import { createMemoryStore, type IdempotencyStore } from '@idemkit/core';
import { createMongoStore } from '@idemkit/mongodb';
import { createPostgresStore } from '@idemkit/postgres';
import { createRedisStore } from '@idemkit/redis';
import { Cluster, Redis } from 'ioredis';
import { MongoClient } from 'mongodb';
import pg from 'pg';

/** A store a fixture process (the app server, the job worker) runs on, and how to let it go. */
export interface OpenedStore {
  readonly store: IdempotencyStore;
  /** The Postgres store's pool, for the app's transactional orders table. */
  readonly pool?: pg.Pool;
  close(): Promise<void>;
}

/**
 * Open the store `kind` at `url` (host:port,… for the cluster) with every record under `prefix`.
 * `onPoolError` hears idle Postgres clients killed by pg_terminate_backend.
 */
export async function openStore(kind: string, url: string, prefix: string, onPoolError: (message: string) => void = () => undefined): Promise<OpenedStore> {
  switch (kind) {
    case 'memory': {
      const store = createMemoryStore();
      return { store, close: () => store.close() };
    }
    case 'postgres': {
      // Short connect timeout: while the server refuses, a request must fail fast, not queue.
      const pool = new pg.Pool({ connectionString: url, max: 10, connectionTimeoutMillis: 2_000 });
      pool.on('error', (e) => onPoolError(e.message));
      const store = createPostgresStore({ pool, table: `${prefix}_keys` });
      await store.migrate();
      return { store, pool, close: async () => { await store.close(); await pool.end(); } };
    }
    case 'redis': {
      const client = new Redis(url, { maxRetriesPerRequest: 1 });
      client.on('error', () => undefined); // reconnects on its own; the engine reports failures
      const store = createRedisStore({ client, prefix: `${prefix}:` });
      return { store, close: async () => { await store.close(); client.disconnect(); } };
    }
    case 'redis-cluster': {
      const nodes = url.split(',').map((n) => ({ host: n.split(':')[0]!, port: Number(n.split(':')[1]) }));
      const client = new Cluster(nodes);
      client.on('error', () => undefined);
      const store = createRedisStore({ client, prefix: `${prefix}:` });
      return { store, close: async () => { await store.close(); client.disconnect(); } };
    }
    case 'mongodb': {
      const client = new MongoClient(url, { serverSelectionTimeoutMS: 3_000 });
      await client.connect();
      const store = createMongoStore({ db: client.db(), collectionName: `${prefix}_keys` });
      await store.ensureIndexes();
      return { store, close: async () => { await store.close(); await client.close(); } };
    }
    default:
      throw new Error(`STORE=${kind} is not supported`);
  }
}
