import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { connect as connectTcp, createServer, type AddressInfo, type Socket } from 'node:net';
import { resolveRedis, resolveRedisCluster, type ResolvedService } from '@idemkit/test-services';
import type { Writable } from 'node:stream';
import { Cluster, Redis } from 'ioredis';

export { uniquePrefix } from '@idemkit/test-services';

/** The single-node Redis for tests (TEST_REDIS_URL); throws with instructions when missing. */
export function redisService(): Promise<ResolvedService<string>> {
  return resolveRedis();
}

/** A connected single-node client (one TCP connection). */
export async function redisClient(url: string): Promise<Redis> {
  const redis = new Redis(url);
  await redis.ping();
  return redis;
}

/** The test cluster (TEST_REDIS_CLUSTER_NODES) and a connected Cluster client on it. */
export async function clusterService(): Promise<{ service: ResolvedService<unknown>; connect: () => Promise<Cluster> }> {
  const service = await resolveRedisCluster();
  const nodes = service.value.map(({ host, port }) => ({ host, port }));
  return {
    service,
    connect: async () => {
      const cluster = new Cluster(nodes);
      await cluster.ping();
      return cluster;
    },
  };
}

/** `addr=` of this client's connection as the server sees it (MONITOR's `source`). */
export async function clientAddr(redis: Redis): Promise<string> {
  const info = String(await redis.client('INFO'));
  const addr = /\baddr=(\S+)/.exec(info)?.[1];
  if (addr === undefined) throw new Error(`no addr in CLIENT INFO: ${info}`);
  return addr;
}

/** Redis's own clock in epoch ms. */
export async function redisNow(redis: Redis | Cluster): Promise<number> {
  const [s, us] = await redis.time();
  return Number(s) * 1000 + Math.floor(Number(us) / 1000);
}

/** Delete every key under `prefix` (SCAN, never KEYS), on each master of a Cluster. */
export async function deleteByPrefix(client: Redis | Cluster, prefix: string): Promise<void> {
  // `isCluster` rather than instanceof: the ioredis 6 test passes clients of another copy.
  const nodes = client.isCluster ? (client as Cluster).nodes('master') : [client as Redis];
  for (const node of nodes) {
    let cursor = '0';
    do {
      const [next, keys] = await node.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000);
      // One key per DEL: keys of different slots may not share a command on a Cluster node.
      if (keys.length > 0) await node.pipeline(keys.map((k) => ['del', k])).exec();
      cursor = next;
    } while (cursor !== '0');
  }
}

/**
 * Count the writes a socket hands to the OS (`_write` for one chunk, `_writev` for several
 * buffered ones): what one `write` syscall per call costs. Returns the count and an undo.
 */
export function countSocketWrites(stream: Writable): { writes: () => number; restore: () => void } {
  const target = stream as Writable & Pick<Writable, '_write' | '_writev'>;
  const { _write: write, _writev: writev } = target;
  let writes = 0;
  target._write = function (...args) {
    writes++;
    return write.apply(this, args);
  };
  if (writev) {
    target._writev = function (...args) {
      writes++;
      return writev.apply(this, args);
    };
  }
  return {
    writes: () => writes,
    restore: () => {
      target._write = write;
      target._writev = writev;
    },
  };
}

/**
 * A redis-server of the test's own on a free 127.0.0.1 port, for what must never be done to the
 * shared one (CONFIG SET maxmemory). Needs `redis-server` on PATH, as `scripts/services.sh` does.
 * `args`: more command-line options (e.g. `--dir`).
 */
export async function ownRedisServer(args: readonly string[] = []): Promise<{ url: string; client: Redis; restart: () => Promise<void>; stop: () => Promise<void> }> {
  const port = await new Promise<number>((resolve, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port: free } = probe.address() as AddressInfo;
      probe.close(() => resolve(free));
    });
  });
  const url = `redis://127.0.0.1:${port}`;
  const client = new Redis(url, { retryStrategy: (times) => (times > 50 ? null : 100) });
  client.on('error', () => undefined);
  const start = async (): Promise<ChildProcess> => {
    const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', ...args], { stdio: 'ignore' });
    const exited = new Promise<never>((_, reject) => {
      child.once('error', (error) => reject(new Error(`redis-server could not start (is it on PATH?): ${error.message}`)));
      child.once('exit', (code) => reject(new Error(`redis-server exited (${code}) before it answered`)));
    });
    exited.catch(() => undefined);
    await Promise.race([client.ping(), exited]);
    return child;
  };
  const kill = async (child: ChildProcess): Promise<void> => {
    child.kill('SIGKILL');
    if (child.exitCode === null && child.signalCode === null) await once(child, 'exit');
  };
  let child = await start();
  return {
    url,
    client,
    // A crash and a restart on the same port (no persistence: an empty Redis, no scripts cached).
    restart: async () => {
      await kill(child);
      child = await start();
    },
    stop: async () => {
      client.disconnect();
      await kill(child);
    },
  };
}

/**
 * A TCP hop to 127.0.0.1 whose target port can change: what a DNS name (a cloud primary endpoint)
 * does in a failover. Connections already open keep their old target, as real ones do; only new
 * connections go to the new one.
 */
export async function retargetableHop(targetPort: number): Promise<{ url: string; retarget: (port: number) => void; close: () => Promise<void> }> {
  let target = targetPort;
  const sockets = new Set<Socket>();
  const server = createServer((downstream) => {
    const upstream = connectTcp(target, '127.0.0.1');
    for (const s of [downstream, upstream]) {
      sockets.add(s);
      s.on('error', () => undefined);
      s.on('close', () => sockets.delete(s));
    }
    downstream.pipe(upstream).pipe(downstream);
    downstream.on('close', () => upstream.destroy());
    upstream.on('close', () => downstream.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `redis://127.0.0.1:${port}`,
    retarget: (next) => void (target = next),
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
