import { Cluster, Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { resolveRedisCluster, uniquePrefix, type ClusterNode, type ResolvedService } from '../src/index.js';

describe('Redis Cluster through the resolver (real cluster)', () => {
  let svc: ResolvedService<ClusterNode[]>;
  let cluster: Cluster;
  const prefix = uniquePrefix('cluster smoke');
  const keys = Array.from({ length: 12 }, (_, i) => `${prefix}${i}`);

  beforeAll(async () => {
    svc = await resolveRedisCluster();
    cluster = new Cluster(
      svc.value.map((n) => ({ host: n.host, port: n.port })),
      { lazyConnect: true, redisOptions: { maxRetriesPerRequest: 1 } },
    );
    await cluster.connect();
  });
  afterAll(async () => {
    if (cluster) await Promise.all(keys.map((k) => cluster.del(k)));
    cluster?.disconnect();
    await svc?.stop();
  });

  it('has at least three masters', async () => {
    expect(cluster.nodes('master').length).toBeGreaterThanOrEqual(3);
  });

  it('writes keys that land on different masters, and reads them back', async () => {
    await Promise.all(keys.map((k, i) => cluster.set(k, String(i), 'PX', 60_000)));
    expect(await Promise.all(keys.map((k) => cluster.get(k)))).toEqual(keys.map((_, i) => String(i)));

    // Ask every master directly which slots hold our keys: each key must live on exactly one
    // master, and together they must span more than one master.
    const masters = cluster.nodes('master') as Redis[];
    const owners = new Map<string, string>();
    for (const key of keys) {
      const slot = Number(await cluster.cluster('KEYSLOT', key));
      const holders: string[] = [];
      for (const m of masters) {
        if (Number(await m.cluster('COUNTKEYSINSLOT', slot)) > 0) holders.push(`${m.options.host}:${m.options.port}`);
      }
      expect(holders).toHaveLength(1);
      owners.set(key, holders[0]!);
    }
    expect(new Set(owners.values()).size).toBeGreaterThanOrEqual(2);
  });
});
