// Micro-benchmark (not a test): begin+complete pairs/s, replays/s and statements per operation.
// Usage: pnpm --filter @idemkit/postgres build && DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//        node packages/postgres/bench/store-bench.mjs [seconds=5] [concurrency=32]
// It works in a throwaway schema that it drops at the end.
import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { createPostgresStore } from '../dist/index.js';

const url = process.env.DATABASE_URL ?? process.env.TEST_POSTGRES_URL;
if (!url) {
  console.error('Set DATABASE_URL (or TEST_POSTGRES_URL), e.g. postgres://postgres@127.0.0.1:5432/test');
  process.exit(1);
}
const seconds = Number(process.argv[2] ?? 5);
const concurrency = Number(process.argv[3] ?? 32);

// Count statements as they enter the driver (each is one round trip).
let statements = 0;
const pool = new pg.Pool({ connectionString: url, max: concurrency });
pool.on('connect', (client) => {
  const query = client.query.bind(client);
  client.query = (...args) => {
    statements++;
    return query(...args);
  };
});
const schema = `idemkit_bench_${randomUUID().replaceAll('-', '').slice(0, 12)}`;
const store = createPostgresStore({ pool, schema });
const body = new TextEncoder().encode(JSON.stringify({ id: 'ord_123', total: 4200, items: [1, 2, 3] }));
const response = { status: 201, headers: [['content-type', 'application/json'], ['location', '/orders/ord_123']], body };

async function phase(name, op) {
  const deadline = Date.now() + seconds * 1000;
  let ops = 0;
  const before = statements;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (Date.now() < deadline) {
        await op();
        ops++;
      }
    }),
  );
  const elapsed = (performance.now() - started) / 1000;
  console.log(`${name.padEnd(24)} ${String(Math.round(ops / elapsed)).padStart(7)} /s   ${((statements - before) / ops).toFixed(2)} statements each`);
}

try {
  await store.migrate();
  await Promise.all(Array.from({ length: concurrency }, () => pool.query('SELECT 1')));
  console.log(`@idemkit/postgres store bench: ${seconds}s per phase, ${concurrency} concurrent workers`);
  const done = [];
  await phase('begin+complete (new key)', async () => {
    const key = `bench:${randomUUID()}`;
    const r = await store.begin(key, 'fp', 60_000);
    if (r.kind !== 'acquired') throw new Error('expected acquired');
    if (!(await store.complete(key, r.token, response, 3_600_000))) throw new Error('complete refused');
    if (done.length < 10_000) done.push(key);
  });
  let i = 0;
  await phase('begin (replay)', async () => {
    const r = await store.begin(done[i++ % done.length], 'fp', 60_000);
    if (r.kind !== 'existing') throw new Error('expected existing');
  });
} finally {
  await pool.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  await pool.end();
}
