import type { IdempotencyStore } from '@idemkit/core';
import { runStoreConformance } from '@idemkit/store-conformance';
import { Redis, type Cluster } from 'ioredis';
import { afterAll, describe, expect, it } from 'vitest';
import { createRedisStore } from '../src/index.js';
import { clusterService, countSocketWrites, deleteByPrefix, uniquePrefix } from './services.js';

const { service, connect } = await clusterService();
const clients: Cluster[] = [];
const open = async (): Promise<Cluster> => {
  const client = await connect();
  clients.push(client);
  return client;
};
const first = await open();
const prefix = uniquePrefix('redis_cluster');

/** Every key the suite passed to `begin`, to check where Cluster put them. */
const suiteKeys = new Set<string>();
function recording(store: IdempotencyStore): IdempotencyStore {
  return new Proxy(store, {
    get(target, prop, receiver) {
      if (prop === 'begin') {
        return (key: string, fingerprint: string | null, leaseMs: number) => {
          suiteKeys.add(key);
          return target.begin(key, fingerprint, leaseMs);
        };
      }
      return Reflect.get(target, prop, receiver) as unknown;
    },
  });
}

runStoreConformance({
  name: 'redis cluster',
  createStore: () => recording(createRedisStore({ client: first, prefix })),
  createSecondStore: async () => recording(createRedisStore({ client: await open(), prefix })),
  nativeExpiry: true,
});

describe('redis cluster: keys spread over the masters', () => {
  afterAll(async () => {
    await deleteByPrefix(first, prefix);
    for (const client of clients) await client.quit();
    await service.stop();
  });

  /** `host:port` of the master serving each key, by CLUSTER KEYSLOT and the client's slot map. */
  async function mastersOf(client: Cluster, keys: string[]): Promise<string[]> {
    const [node] = client.nodes('master');
    if (!node) throw new Error('no master in the cluster');
    const pipeline = node.pipeline();
    for (const key of keys) pipeline.cluster('KEYSLOT', key);
    const replies = (await pipeline.exec()) ?? [];
    return replies.map(([err, slot]) => {
      if (err) throw err;
      const owner = client.slots[Number(slot)]?.[0];
      if (owner === undefined) throw new Error(`slot ${String(slot)} has no master`);
      return owner;
    });
  }

  it('the conformance keys hash to every master (no hash tag pins them to one slot)', async () => {
    const masters = first.nodes('master');
    expect(masters.length).toBeGreaterThanOrEqual(3);
    expect(suiteKeys.size).toBeGreaterThan(100);
    const owners = await mastersOf(first, [...suiteKeys].map((k) => prefix + k));
    const perMaster = new Map<string, number>();
    for (const o of owners) perMaster.set(o, (perMaster.get(o) ?? 0) + 1);
    expect(perMaster.size).toBe(masters.length);
    // Roughly even: no master is starved of records.
    for (const count of perMaster.values()) expect(count).toBeGreaterThan(suiteKeys.size / (masters.length * 4));
  });

  it('begins sent in one turn leave in one write per master, and no master stays corked', async () => {
    const store = createRedisStore({ client: first, prefix });
    // Scripts loaded on every master first, so no EVALSHA → EVAL retry adds writes.
    await Promise.all(Array.from({ length: 30 }, (_, i) => store.get(`batch-warm:${i}`)));
    await Promise.all(Array.from({ length: 30 }, (_, i) => store.begin(`batch-warm:${i}`, 'fp', 60_000)));
    const masters = first.nodes('master');
    const counters = masters.map((node) => countSocketWrites(node.stream));
    try {
      const results = await Promise.all(Array.from({ length: 60 }, (_, i) => store.begin(`batch:${i}`, 'fp', 60_000)));
      expect(results.every((r) => r.kind === 'acquired')).toBe(true);
      const writes = counters.map((c) => c.writes());
      // 60 keys over 3+ masters: each master got its share in a single write.
      expect(writes.every((w) => w === 1)).toBe(true);
      expect(masters.map((node) => node.stream.writableCorked)).toEqual(masters.map(() => 0));
    } finally {
      for (const c of counters) c.restore();
    }
  });

  it('records really live on several masters (SCAN on each master finds its share)', async () => {
    const store = createRedisStore({ client: first, prefix });
    const keys = Array.from({ length: 60 }, (_, i) => `spread:${i}`);
    await Promise.all(
      keys.map(async (key) => {
        const r = await store.begin(key, 'fp', 60_000);
        if (r.kind !== 'acquired') throw new Error('expected acquired');
        expect(await store.complete(key, r.token, { status: 200, headers: [], body: new Uint8Array([1]) }, 60_000)).toBe(true);
      }),
    );
    const found: number[] = [];
    for (const node of first.nodes('master')) {
      let cursor = '0';
      let count = 0;
      do {
        const [next, batch] = await node.scan(cursor, 'MATCH', `${prefix}spread:*`, 'COUNT', 1000);
        count += batch.length;
        cursor = next;
      } while (cursor !== '0');
      found.push(count);
    }
    expect(found.reduce((a, b) => a + b, 0)).toBe(keys.length);
    expect(found.filter((c) => c > 0).length).toBeGreaterThanOrEqual(3);
    // The same key is one record wherever the request lands: a second Cluster client replays it.
    const other = createRedisStore({ client: await open(), prefix });
    for (const key of keys.slice(0, 10)) {
      const again = await other.begin(key, 'fp', 60_000);
      expect(again.kind).toBe('existing');
    }
  });

  it('a single-node client on one of its nodes gets an error that says to pass a Cluster, not a bare MOVED, and no retried releases', async () => {
    const { host, port } = first.nodes('master')[0]!.options;
    const single = new Redis({ host, port });
    const store = createRedisStore({ client: single, prefix });
    const sent: string[] = [];
    const sendCommand = single.sendCommand.bind(single);
    single.sendCommand = ((command: { name: string }) => {
      sent.push(command.name);
      return sendCommand(command as never);
    }) as typeof single.sendCommand;
    try {
      // 20 keys: most live on another master, which answers MOVED.
      const results = await Promise.allSettled(Array.from({ length: 20 }, (_, i) => store.begin(`single-${i}-${Date.now()}`, 'fp', 60_000)));
      const refused = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
      expect(refused.length).toBeGreaterThan(0);
      for (const r of refused) expect(String((r.reason as Error).message)).toMatch(/part of a Cluster.*single-node client.*Cluster/);
      const claims = sent.length;
      // Nothing landed for those: no release is sent after them (before, each retried every 5 s for the lease).
      await new Promise((resolve) => setTimeout(resolve, 400));
      expect(sent.length).toBe(claims);
    } finally {
      await store.close();
      single.disconnect();
    }
  });
});
