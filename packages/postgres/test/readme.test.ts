// #region imports
import { createIdempotencyEngine } from '@idemkit/core';
import { createPostgresStore, pgTransaction } from '@idemkit/postgres';
import pg from 'pg';
// #endregion imports
// #region jobs-imports
import { idempotentTransaction } from '@idemkit/core';
// #endregion jobs-imports
import { randomUUID } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { afterAll, beforeAll, expect, it, vi } from 'vitest';
import { postgresUrl, TEST_PREFIX } from './helpers.js';

/*
 * The README's examples are the regions of this file (imports + body), so the README can only
 * show code that runs. Each example gets a fresh database: the README uses the default
 * public.idempotency_keys table, which must not collide with other test files.
 */
let admin: pg.Pool;
const database = `${TEST_PREFIX}readme_${randomUUID().replaceAll('-', '').slice(0, 12)}`;

beforeAll(async () => {
  const url = await postgresUrl();
  admin = new pg.Pool({ connectionString: url, max: 1 });
  await admin.query(`CREATE DATABASE "${database}"`);
  const target = new URL(url);
  target.pathname = `/${database}`;
  process.env.DATABASE_URL = target.toString();
});

afterAll(async () => {
  // pool.end() resolves once its clients are told to end, before their backends are gone. FORCE
  // would then kill a backend still closing, and its pool re-emits that as an 'error' after the
  // test is over (an uncaught exception in vitest). So wait for the backends to leave first; FORCE
  // only for what is still there after that.
  const deadline = Date.now() + 5000;
  while (Date.now() < deadline) {
    const { rows } = await admin.query<{ n: number }>('SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = $1', [database]);
    if (rows[0]?.n === 0) break;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  await admin.query(`DROP DATABASE IF EXISTS "${database}" WITH (FORCE)`);
  await admin.end();
});

async function region(name: string): Promise<string> {
  const text = await readFile(new URL(import.meta.url), 'utf8');
  const match = new RegExp(`// #region ${name}\\n([\\s\\S]*?)\\n\\s*// #endregion ${name}`).exec(text);
  if (!match?.[1]) throw new Error(`region ${name} not found`);
  const lines = match[1].split('\n');
  const indent = Math.min(...lines.filter((l) => l.trim() !== '').map((l) => /^ */.exec(l)?.[0].length ?? 0));
  return lines.map((l) => l.slice(indent)).join('\n');
}

async function readmeBlock(marker: string): Promise<string> {
  const readme = await readFile(new URL('../README.md', import.meta.url), 'utf8');
  const match = new RegExp(`<!-- ${marker} -->\\n\`\`\`ts\\n([\\s\\S]*?)\\n\`\`\``).exec(readme);
  if (!match?.[1]) throw new Error(`README block ${marker} not found`);
  return match[1];
}

it('README quick start is this code', async () => {
  expect(await readmeBlock('quick-start')).toBe(`${await region('imports')}\n\n${await region('quick-start')}`);
});

it('README transactional example is this code', async () => {
  expect(await readmeBlock('transactional')).toBe(await region('transactional'));
});

it('README jobs example is this code', async () => {
  expect(await readmeBlock('jobs')).toBe(`${await region('jobs-imports')}\n\n${await region('jobs')}`);
});

it('quick start runs: first request runs, the retry replays', async () => {
  const log = vi.spyOn(console, 'log').mockImplementation(() => undefined);
  // #region quick-start
  const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL });
  // pg's advice: a pool with no 'error' listener crashes the process when the server drops an idle connection.
  pool.on('error', (error) => console.error('Postgres dropped an idle connection:', error.message));
  const store = createPostgresStore({ pool });
  await store.migrate(); // once at startup; or apply sql/schema.sql with your migration tool

  // Bindings take the store: app.use(idempotency({ store })). The engine underneath them:
  const engine = createIdempotencyEngine({ store });
  const request = {
    method: 'POST',
    path: '/orders',
    headers: { 'idempotency-key': 'order-7f3a' },
    body: { sku: 'A1', qty: 2 },
  };

  const first = await engine.decide(request);
  if (first.kind === 'run') {
    const body = new TextEncoder().encode('{"id":1}');
    await first.lease.commit({ status: 201, headers: [['content-type', 'application/json']], body });
  }
  const retry = await engine.decide(request);
  console.log(retry.kind); // 'replay': the stored 201 and its body, byte for byte
  // At shutdown: await pool.end(). The store never ends your pool (until then the process stays up).
  // #endregion quick-start
  expect(log).toHaveBeenCalledWith('replay');
  log.mockRestore();

  // The server drops the pool's idle connections (a restart, a failover, idle_session_timeout):
  // the README's pool logs it and goes on; without its listener the process would crash here.
  const dropped = vi.spyOn(console, 'error').mockImplementation(() => undefined);
  const idle = pool.idleCount;
  expect(idle).toBeGreaterThan(0);
  await admin.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1', [database]);
  await vi.waitFor(() => expect(dropped).toHaveBeenCalledTimes(idle), { timeout: 10_000 });
  expect(dropped).toHaveBeenCalledWith('Postgres dropped an idle connection:', expect.stringContaining('terminating connection'));
  dropped.mockRestore();

  // #region transactional
  await pool.query('CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, sku text NOT NULL)');
  const txEngine = createIdempotencyEngine({ store, transactional: true });

  async function placeOrder(key: string, sku: string, fail = false): Promise<string> {
    const decision = await txEngine.decide({ method: 'POST', path: '/orders', headers: { 'idempotency-key': key }, body: { sku } });
    if (decision.kind === 'replay') return new TextDecoder().decode(decision.response.body);
    if (decision.kind !== 'run') throw new Error(decision.kind);
    try {
      // In a binding: pgTransaction(req.idempotency) (Express), ctx.state.idempotency (Koa), request.idempotency (Fastify).
      const tx = pgTransaction(decision.lease.context);
      const { rows } = await tx.query<{ id: number }>('INSERT INTO orders (sku) VALUES ($1) RETURNING id', [sku]);
      if (fail) throw new Error('payment declined');
      const body = new TextEncoder().encode(`order ${rows[0]?.id}`);
      // Stores the response and COMMITs the INSERT in one transaction.
      await decision.lease.commit({ status: 201, headers: [['content-type', 'text/plain']], body });
      return `order ${rows[0]?.id}`;
    } catch (error) {
      await decision.lease.abandon('handler-threw'); // ROLLBACK: the INSERT vanishes, the key is free again
      throw error;
    }
  }

  await placeOrder('order-9c1d', 'B2', true).catch(() => undefined); // fails: no order row, no record
  const placed = await placeOrder('order-9c1d', 'B2'); // the retry runs and commits exactly one row
  const replayed = await placeOrder('order-9c1d', 'B2'); // replayed, nothing inserted
  await pool.end(); // your pool: the store never ends it
  // #endregion transactional
  expect(replayed).toBe(placed);
  const check = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: 1 });
  const { rows } = await check.query<{ n: number }>("SELECT count(*)::int AS n FROM orders WHERE sku = 'B2'");
  await check.end();
  expect(rows[0]?.n).toBe(1);
});

it('jobs example runs: a message delivered three times at once charges once, and all three get that charge', async () => {
  // #region jobs
  const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL });
  pool.on('error', (error) => console.error('Postgres dropped an idle connection:', error.message));
  const store = createPostgresStore({ pool });
  await store.migrate();
  await pool.query('CREATE TABLE IF NOT EXISTS charges (order_id text NOT NULL, cents int NOT NULL)');

  // fn gets the transaction's client first; its writes commit with the stored result, or not at all.
  const charge = idempotentTransaction(
    async (tx, order: { id: string; cents: number }) => {
      await tx.query('INSERT INTO charges (order_id, cents) VALUES ($1, $2)', [order.id, order.cents]);
      return { charged: order.cents };
    },
    { store, name: 'charge', key: (order) => `charge:${order.id}` },
  );

  const order = { id: 'ord_42', cents: 4200 };
  // A queue delivering one message three times at once: one row, one result for all three.
  const results = await Promise.all([charge(order), charge(order), charge(order)]);
  await pool.end();
  // #endregion jobs
  expect(results).toEqual([{ charged: 4200 }, { charged: 4200 }, { charged: 4200 }]);
  const check = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: 1 });
  const { rows } = await check.query<{ n: number }>("SELECT count(*)::int AS n FROM charges WHERE order_id = 'ord_42'");
  await check.end();
  expect(rows[0]?.n).toBe(1);
});
