// Micro-benchmark (not a test): begin + complete pairs per second on new keys, plus replays
// (begin on a completed key). Uses the built package, as a user would.
//
//   pnpm --filter @idemkit/mongodb build
//   TEST_MONGODB_URL=mongodb://127.0.0.1:27117/ node packages/mongodb/bench/store-bench.mjs [seconds=5] [concurrency=32] [bodyBytes=512]
//
// Works in its own database (idemkit_bench_<random>), dropped at the end.
import { randomBytes } from 'node:crypto';
import { MongoClient } from 'mongodb';
import { createMongoStore } from '../dist/index.js';

const seconds = Number(process.argv[2] ?? 5);
const concurrency = Number(process.argv[3] ?? 32);
const bodyBytes = Number(process.argv[4] ?? 512);
const body = new Uint8Array(bodyBytes).map((_, i) => i & 0xff);
const response = { status: 201, headers: [['content-type', 'application/json']], body };

const url = process.env.TEST_MONGODB_URL ?? process.env.MONGODB_URL;
if (!url) {
  console.error('Set TEST_MONGODB_URL (e.g. mongodb://127.0.0.1:27117/).');
  process.exit(2);
}

async function run(label, work) {
  let ops = 0;
  let n = 0;
  const latencies = [];
  const deadline = performance.now() + seconds * 1000;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < deadline) {
        const t0 = performance.now();
        await work(n++);
        latencies.push(performance.now() - t0);
        ops++;
      }
    }),
  );
  latencies.sort((a, b) => a - b);
  const p = (q) => latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))].toFixed(2);
  console.log(
    `${label.padEnd(34)} ${(ops / seconds).toFixed(0).padStart(7)}/s   p50 ${p(0.5)} ms  p99 ${p(0.99)} ms` +
      `   (concurrency ${concurrency}, body ${bodyBytes} B, ${seconds} s)`,
  );
}

const client = new MongoClient(url);
await client.connect();
const db = client.db(`idemkit_bench_${randomBytes(4).toString('hex')}`);
try {
  const store = createMongoStore({ db, logger: false });
  await store.ensureIndexes();
  const info = await db.admin().command({ buildInfo: 1 });
  console.log(`server: ${info.ferretdbVersion ? `FerretDB ${info.ferretdbVersion}` : `MongoDB ${info.version}`}, fencing: ${await store.fencing()}`);

  const pair = async (key) => {
    const r = await store.begin(key, 'fp', 30_000);
    if (r.kind !== 'acquired') throw new Error(`bench key ${key} was not new`);
    if (!(await store.complete(key, r.token, response, 60_000))) throw new Error('complete refused');
  };
  for (let i = 0; i < 100; i++) await pair(`warm:${i}`); // connections, clock offset, fencing
  await run('begin+complete pairs (new keys)', (i) => pair(`k:${i}`));
  await run('begin on a completed key (replay)', async (i) => {
    const r = await store.begin(`warm:${i % 100}`, 'fp', 30_000);
    if (r.kind !== 'existing') throw new Error('expected a replay');
  });
  await store.close();
} finally {
  await db.dropDatabase();
  await client.close();
}
