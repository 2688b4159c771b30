import { Redis, Cluster } from 'ioredis';
import { MongoClient } from 'mongodb';
import pg from 'pg';

export type StoreKind = 'postgres' | 'redis' | 'redis-cluster' | 'mongodb';

/** What a store holds under one namespace of the fixture app (PREFIX) or the demo (DEMO_NAMESPACE). */
export interface RecordCounts {
  readonly total: number;
  readonly completed: number;
  /** in_progress records, whatever their lease says. */
  readonly inProgress: number;
  /** in_progress records whose lease has not ended: someone may still be running. */
  readonly liveLeases: number;
  readonly keys: string[];
}

/** Where each store keeps its records, for the fixture app (`app`) or the demo (`demo`). */
export function location(kind: StoreKind, namespace: string, owner: 'app' | 'demo'): string {
  if (kind === 'redis' || kind === 'redis-cluster') return owner === 'app' ? `${namespace}:` : `${namespace}:idem:`;
  return owner === 'app' ? `${namespace}_keys` : `${namespace}_idempotency_keys`;
}

/** Read the records straight from the server (not through the store under test). */
export async function countRecords(kind: StoreKind, url: string, where: string): Promise<RecordCounts> {
  if (kind === 'postgres') {
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    try {
      const { rows } = await client.query<{ key: string; state: string; live: boolean }>(
        `SELECT key, state, (state = 'in_progress' AND lease_expires_at > now()) AS live FROM "${where}"`,
      );
      return tally(rows.map((r) => ({ key: r.key, state: r.state, live: r.live })));
    } finally {
      await client.end();
    }
  }
  if (kind === 'mongodb') {
    const client = await MongoClient.connect(url);
    try {
      const docs = await client.db().collection<{ _id: string; state: string; leaseExpiresAt?: Date | null }>(where).find({}).toArray();
      const now = Date.now();
      return tally(docs.map((d) => ({ key: d._id, state: d.state, live: d.state === 'in_progress' && (d.leaseExpiresAt?.getTime() ?? 0) > now })));
    } finally {
      await client.close();
    }
  }
  const nodes = kind === 'redis-cluster' ? url.split(',').map((n) => ({ host: n.split(':')[0]!, port: Number(n.split(':')[1]) })) : [];
  const client = kind === 'redis' ? new Redis(url) : new Cluster(nodes);
  try {
    const masters = client instanceof Cluster ? (await client.ping(), client.nodes('master')) : [client];
    const keys: string[] = [];
    for (const node of masters) {
      let cursor = '0';
      do {
        const [next, batch] = await node.scan(cursor, 'MATCH', `${where}*`, 'COUNT', 500);
        cursor = next;
        keys.push(...batch);
      } while (cursor !== '0');
    }
    const [time] = [await client.time()];
    const now = Number(time[0]) * 1000 + Math.floor(Number(time[1]) / 1000);
    const rows = [];
    for (const key of keys) {
      // Layout in @idemkit/redis src/scripts.ts: 'd:…' (or, written before it kept the token,
      // 'c:…') completed; in progress either
      // 'i:<grace>:<lease>:…' (lease end = PEXPIRETIME - grace) or 'p:<created>:<leaseEnd>:…'.
      const value = (await client.get(key)) ?? '';
      const [tag, a, b] = value.split(':');
      const leaseEnd = tag === 'i' ? (await client.pexpiretime(key)) - Number(a) : Number(b);
      const state = tag === 'd' || tag === 'c' ? 'completed' : tag === 'i' || tag === 'p' ? 'in_progress' : '?';
      rows.push({ key: key.slice(where.length), state, live: state === 'in_progress' && leaseEnd > now });
    }
    return tally(rows);
  } finally {
    client.disconnect();
  }
}

function tally(rows: ReadonlyArray<{ key: string; state: string; live: boolean }>): RecordCounts {
  return {
    total: rows.length,
    completed: rows.filter((r) => r.state === 'completed').length,
    inProgress: rows.filter((r) => r.state === 'in_progress').length,
    liveLeases: rows.filter((r) => r.live).length,
    keys: rows.map((r) => r.key),
  };
}

/** Leave nothing behind on the shared servers. */
export async function dropNamespace(kind: StoreKind, url: string, tables: string[], redisPrefix?: string): Promise<void> {
  if (kind === 'postgres') {
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    await client.query(`DROP TABLE IF EXISTS ${tables.map((t) => `"${t}"`).join(', ')}`);
    await client.end();
  } else if (kind === 'mongodb') {
    const client = await MongoClient.connect(url);
    for (const t of tables) await client.db().collection(t).drop().catch(() => undefined);
    // The store's claim collection (FerretDB fencing), if any, shares the prefix.
    const names = (await client.db().listCollections({}, { nameOnly: true }).toArray()).map((c) => c.name);
    for (const n of names.filter((n) => tables.some((t) => n.startsWith(t)))) await client.db().collection(n).drop().catch(() => undefined);
    await client.close();
  } else if (redisPrefix !== undefined) {
    const nodes = kind === 'redis-cluster' ? url.split(',').map((n) => ({ host: n.split(':')[0]!, port: Number(n.split(':')[1]) })) : [];
    const client = kind === 'redis' ? new Redis(url) : new Cluster(nodes);
    const masters = client instanceof Cluster ? (await client.ping(), client.nodes('master')) : [client];
    for (const node of masters) {
      let cursor = '0';
      do {
        const [next, batch] = await node.scan(cursor, 'MATCH', `${redisPrefix}*`, 'COUNT', 500);
        cursor = next;
        for (const k of batch) await node.del(k);
      } while (cursor !== '0');
    }
    client.disconnect();
  }
}
