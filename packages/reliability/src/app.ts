/**
 * The fixture server the reliability tests start as child processes (`node dist/app.js`). Unlike
 * the demo it exposes the knobs faults need: a short lease, a short store timeout, a per-request
 * handler duration, a scope from an auth header, and a line on stdout each time the handler starts
 * (pipes are written synchronously on Linux, so the line survives a SIGKILL that follows it).
 *
 * Env: FRAMEWORK (fastify|express|koa), STORE (memory|postgres|redis|redis-cluster|mongodb),
 * STORE_URL (URL, or host:port,… for the cluster), PREFIX (namespace of keys/tables/collections),
 * LEASE_MS, STORE_TIMEOUT_MS, WORK_MS (default handler time; header x-work-ms overrides), PORT,
 * TRANSACTIONAL=1 (Postgres: the handler inserts an order row in the record's transaction first).
 */
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import type { Server } from 'node:http';
import type { IdempotencyEvent, IdempotencyOptions, IdempotencyStore } from '@idemkit/core';
import { idempotency as expressIdempotency } from '@idemkit/express';
import fastifyIdempotency from '@idemkit/fastify';
import { idempotency as koaIdempotency } from '@idemkit/koa';
import { bodyParser } from '@koa/bodyparser';
import Router from '@koa/router';
import express, { type ErrorRequestHandler, type Request } from 'express';
import Fastify, { type FastifyError, type FastifyRequest } from 'fastify';
import Koa from 'koa';
import type pg from 'pg';
import { openStore } from './open-store.js';

const env = process.env;
const FRAMEWORK = env.FRAMEWORK ?? 'fastify';
const STORE = env.STORE ?? 'memory';
const PREFIX = env.PREFIX ?? 'rel';
const LEASE_MS = Number(env.LEASE_MS ?? 60_000);
const STORE_TIMEOUT_MS = Number(env.STORE_TIMEOUT_MS ?? 5_000);
const WORK_MS = Number(env.WORK_MS ?? 0);
const BODY_LIMIT = 100 * 1024;
const TRANSACTIONAL = env.TRANSACTIONAL === '1' && STORE === 'postgres';
const ORDERS = `"${PREFIX}_orders"`;

/**
 * The tests start two app processes at once, and CREATE TABLE IF NOT EXISTS is not safe under
 * concurrency in Postgres (the loser can fail on pg_type's unique index; seen in CI), so the
 * creation is serialised on a transaction-scoped advisory lock, as the store's migrate() does.
 */
async function createOrders(pool: pg.Pool): Promise<void> {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    await client.query('SELECT pg_advisory_xact_lock(hashtext($1))', [ORDERS]);
    await client.query(`CREATE TABLE IF NOT EXISTS ${ORDERS} (id text PRIMARY KEY, label text NOT NULL)`);
    await client.query('COMMIT');
  } catch (error) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw error;
  } finally {
    client.release();
  }
}

/** One stdout line per fact the tests observe (handler start, lost lease, takeover). */
function line(kind: string, data: unknown): void {
  process.stdout.write(`${kind} ${JSON.stringify(data)}\n`);
}

// The soak turns this off (TRACK=0): a map growing with every key would be a leak of the fixture.
const TRACK = env.TRACK !== '0';
const executions = new Map<string, number>();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Answer {
  readonly status: number;
  readonly body: unknown;
}

interface Ctx {
  readonly key: string;
  readonly transaction: unknown;
}

/** The side effect under test: counted, announced, slow on request, answered with a fresh id. */
async function handle(ctx: Ctx | null | undefined, scope: string | undefined, workHeader: unknown, body: unknown): Promise<Answer> {
  const key = ctx?.key;
  const id = `ex_${randomUUID()}`;
  const label = `${scope ?? ''}|${key ?? ''}`;
  if (TRACK) executions.set(label, (executions.get(label) ?? 0) + 1);
  line('RUN', { key, scope, id, pid: process.pid });
  // Transactional mode: the business write happens first, so a holder that stalls or dies after it
  // shows whether the write commits only with the stored response.
  const tx = ctx?.transaction as pg.PoolClient | undefined;
  if (tx) await tx.query(`INSERT INTO ${ORDERS} (id, label) VALUES ($1, $2)`, [id, label]);
  const work = typeof workHeader === 'string' && /^\d+$/.test(workHeader) ? Number(workHeader) : WORK_MS;
  if (work > 0) await sleep(work);
  return { status: 201, body: { id, key, scope: scope ?? null, pid: process.pid, echo: body ?? null } };
}

/** Memory after a full GC when the process runs with --expose-gc (the soak does), so growth means a leak. */
function stats(gc: boolean) {
  const collect = (globalThis as { gc?: () => void }).gc;
  if (gc && collect) collect();
  const { rss, heapUsed } = process.memoryUsage();
  return { pid: process.pid, rss, heapUsed, executions: Object.fromEntries(executions) };
}
const wantsGc = (url: string | undefined) => url?.includes('gc=1') ?? false;

const problemBody = (status: number, slug: string, title: string) =>
  JSON.stringify({ type: `https://idemkit.dev/reliability/problems/${slug}`, title, status });

function userOf(headers: Record<string, string | string[] | undefined>): string | undefined {
  const value = headers['x-user'];
  return typeof value === 'string' && value !== '' ? value : undefined;
}

function idempotencyOptions<Req>(store: IdempotencyStore): IdempotencyOptions<Req> {
  return {
    store,
    leaseMs: LEASE_MS,
    storeTimeoutMs: STORE_TIMEOUT_MS,
    transactional: TRANSACTIONAL,
    onEvent: (e: IdempotencyEvent) => {
      if (e.type === 'lease-lost' || e.type === 'lease-taken-over') line(e.type.toUpperCase(), e);
    },
    logger: { warn: () => undefined, error: () => undefined },
  };
}

interface Running {
  readonly url: string;
  close(): Promise<void>;
}

async function listen(server: Server): Promise<string> {
  await new Promise<void>((resolve, reject) => server.once('listening', resolve).once('error', reject));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

async function startFastify(store: IdempotencyStore): Promise<Running> {
  const app = Fastify({ bodyLimit: BODY_LIMIT });
  app.setErrorHandler((err: FastifyError, _req, reply) => {
    const status = err.statusCode && err.statusCode < 500 ? err.statusCode : 500;
    if (status === 500) line('ERROR', { message: err.message, name: err.name });
    return reply.code(status).type('application/problem+json').send(problemBody(status, err.code ?? 'error', err.message));
  });
  await app.register(fastifyIdempotency, { ...idempotencyOptions<FastifyRequest>(store), scope: (req) => userOf(req.headers) });
  app.get('/stats', async (req) => stats(wantsGc(req.url)));
  app.post('/orders', async (req, reply) => {
    const a = await handle(req.idempotency, userOf(req.headers), req.headers['x-work-ms'], req.body);
    return reply.code(a.status).send(a.body);
  });
  await app.listen({ port: Number(env.PORT ?? 0), host: '127.0.0.1' });
  return { url: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`, close: () => app.close() };
}

async function startExpress(store: IdempotencyStore): Promise<Running> {
  const app = express();
  app.use(express.json({ limit: BODY_LIMIT }));
  app.get('/stats', (req, res) => void res.json(stats(wantsGc(req.url))));
  app.post(
    '/orders',
    expressIdempotency({ ...idempotencyOptions<Request>(store), scope: (req) => userOf(req.headers) }),
    async (req, res) => {
      const a = await handle(req.idempotency, userOf(req.headers), req.headers['x-work-ms'], req.body);
      res.status(a.status).json(a.body);
    },
  );
  const onError: ErrorRequestHandler = (err: { status?: number; type?: string; message?: string }, _req, res, _next) => {
    const status = err.status && err.status < 500 ? err.status : 500;
    if (status === 500) line('ERROR', { message: err.message });
    res.status(status).type('application/problem+json').send(problemBody(status, err.type ?? 'error', err.message ?? 'error'));
  };
  app.use(onError);
  const server = app.listen(Number(env.PORT ?? 0), '127.0.0.1');
  const url = await listen(server);
  return { url, close: () => new Promise((r) => { server.closeAllConnections(); server.close(() => r()); }) };
}

async function startKoa(store: IdempotencyStore): Promise<Running> {
  const app = new Koa();
  const router = new Router();
  app.use(async (ctx, next) => {
    try {
      await next();
    } catch (err) {
      const e = err as { status?: number; type?: string; message?: string };
      const status = e.status && e.status < 500 ? e.status : err instanceof SyntaxError ? 400 : 500;
      if (status === 500) line('ERROR', { message: e.message });
      ctx.status = status;
      ctx.type = 'application/problem+json';
      ctx.body = problemBody(status, e.type ?? 'error', e.message ?? 'error');
    }
  });
  app.use(bodyParser({ enableTypes: ['json'], jsonLimit: `${BODY_LIMIT}b` }));
  const guard = koaIdempotency({ ...idempotencyOptions<Koa.Context>(store), scope: (ctx) => userOf(ctx.headers) });
  router.get('/stats', (ctx) => { ctx.body = stats(wantsGc(ctx.url)); });
  router.post('/orders', guard, async (ctx) => {
    const a = await handle(ctx.state.idempotency as Ctx | undefined, userOf(ctx.headers), ctx.headers['x-work-ms'], ctx.request.body);
    ctx.status = a.status;
    ctx.body = a.body;
  });
  app.use(router.routes()).use(router.allowedMethods());
  app.on('error', () => undefined);
  const server = app.listen(Number(env.PORT ?? 0), '127.0.0.1');
  const url = await listen(server);
  return { url, close: () => new Promise((r) => { server.closeAllConnections(); server.close(() => r()); }) };
}

const opened = await openStore(STORE, env.STORE_URL ?? '', PREFIX, (message) => line('POOL-ERROR', message));
if (TRANSACTIONAL && opened.pool) await createOrders(opened.pool);
const start = { fastify: startFastify, express: startExpress, koa: startKoa }[FRAMEWORK];
if (!start) throw new Error(`FRAMEWORK=${FRAMEWORK} is not supported`);
const running = await start(opened.store);
console.log(`reliability app (${FRAMEWORK}, ${STORE}) pid ${process.pid} on ${running.url}`);
const stop = () => {
  running.close().then(() => opened.close()).then(() => process.exit(0), () => process.exit(1));
};
process.once('SIGTERM', stop);
process.once('SIGINT', stop);
