// Micro-benchmark (not a test): begin + complete pairs per second on new keys, single node and
// Redis Cluster. Uses the built package, as a user would.
//
//   pnpm --filter @idemkit/redis build
//   TEST_REDIS_URL=redis://127.0.0.1:6379 TEST_REDIS_CLUSTER_NODES=127.0.0.1:7101,... \
//     node packages/redis/bench/store-bench.mjs [seconds=5] [concurrency=64] [bodyBytes=512]
//
// Either variable may be left out to skip that target. Records get a 60 s TTL and a unique
// prefix, so a run leaves nothing behind for long.
import { randomUUID } from 'node:crypto';
import { Cluster, Redis } from 'ioredis';
import { createRedisStore } from '../dist/index.js';

const seconds = Number(process.argv[2] ?? 5);
const concurrency = Number(process.argv[3] ?? 64);
const bodyBytes = Number(process.argv[4] ?? 512);
const body = new Uint8Array(bodyBytes).map((_, i) => i & 0xff);
const response = { status: 201, headers: [['content-type', 'application/json']], body };

async function bench(label, client) {
  const store = createRedisStore({ client, prefix: `idemkit-bench:${randomUUID()}:` });
  // Warm up: connections, slot map, script cache.
  for (let i = 0; i < 200; i++) await pair(store, `warm:${i}`);
  let pairs = 0;
  let n = 0;
  const latencies = [];
  const deadline = performance.now() + seconds * 1000;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < deadline) {
        const t0 = performance.now();
        await pair(store, `k:${n++}`);
        latencies.push(performance.now() - t0);
        pairs++;
      }
    }),
  );
  latencies.sort((a, b) => a - b);
  const p = (q) => latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))].toFixed(2);
  console.log(
    `${label.padEnd(28)} ${(pairs / seconds).toFixed(0).padStart(8)} begin+complete pairs/s` +
      `   p50 ${p(0.5)} ms  p99 ${p(0.99)} ms   (concurrency ${concurrency}, body ${bodyBytes} B, ${seconds} s)`,
  );
  await store.close();
}

async function pair(store, key) {
  const r = await store.begin(key, 'fp', 30_000);
  if (r.kind !== 'acquired') throw new Error(`bench key ${key} was not new`);
  if (!(await store.complete(key, r.token, response, 60_000))) throw new Error('complete refused');
}

const url = process.env.TEST_REDIS_URL ?? process.env.REDIS_URL;
const nodes = process.env.TEST_REDIS_CLUSTER_NODES;
if (!url && !nodes) {
  console.error('Set TEST_REDIS_URL and/or TEST_REDIS_CLUSTER_NODES (host:port,host:port,...).');
  process.exit(2);
}
if (url) {
  const redis = new Redis(url);
  await bench('redis single node', redis);
  await redis.quit();
}
if (nodes) {
  const cluster = new Cluster(
    nodes.split(',').map((n) => {
      const [host, port] = n.trim().split(':');
      return { host, port: Number(port) };
    }),
  );
  await cluster.ping(); // ready: the slot map and the master list are loaded
  await bench(`redis cluster (${cluster.nodes('master').length} masters)`, cluster);
  await cluster.quit();
}
