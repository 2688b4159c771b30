/**
 * Transactional mode on Postgres, through the bindings over real sockets: a handler that awaits
 * its transaction and then answers a status that is not stored (500, 429, …) has its writes rolled
 * back and its key freed *before* its answer goes out (SPEC §2), so a client retrying at once runs
 * the operation again instead of meeting a 409 that says to wait a whole lease. Express and Koa.
 * Fastify is run here too, but frees such a key only as the answer finishes: it cannot tell the
 * handler's own answer after an await from a timeout's until the handler settles (its README).
 */
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import type { Server, ServerResponse } from 'node:http';
import type { IdempotencyEvent } from '@idemkit/core';
import { idempotency as expressIdempotency, idempotencyErrorHandler } from '@idemkit/express';
import fastifyIdempotency from '@idemkit/fastify';
import { idempotency as koaIdempotency } from '@idemkit/koa';
import { pgTransaction } from '@idemkit/postgres';
import { bodyParser } from '@koa/bodyparser';
import Router from '@koa/router';
import express from 'express';
import Fastify from 'fastify';
import Koa from 'koa';
import { describe, expect, it, vi } from 'vitest';
import { ordersSchema } from './support/orders-schema.js';

const db = ordersSchema('own_answer_hp');

interface Harness {
  url: string;
  /** Per key: whether its response had begun to go out when its key was freed. */
  readonly sentWhenFreed: Map<string, boolean>;
  close(): Promise<void>;
}

/** The handler: insert in the transaction, then answer `status` the first time, 201 after. */
async function start(framework: 'express' | 'koa' | 'fastify', status: number): Promise<Harness> {
  const responses = new Map<string, ServerResponse>();
  const sentWhenFreed = new Map<string, boolean>();
  const runs = new Map<string, number>();
  const options = {
    store: db.store,
    transactional: true,
    logger: false as const,
    onEvent: (event: IdempotencyEvent) => {
      if (event.type === 'released') sentWhenFreed.set(event.key, responses.get(event.key)?.headersSent ?? false);
    },
  };
  const work = async (context: { key: string; transaction: unknown } | null | undefined, res: ServerResponse): Promise<number> => {
    const key = context?.key ?? '';
    responses.set(key, res);
    const n = (runs.get(key) ?? 0) + 1;
    runs.set(key, n);
    await pgTransaction(context).query(`INSERT INTO ${db.rows} (ref) VALUES ($1)`, [key]);
    return n === 1 ? status : 201;
  };
  let server: Server;
  if (framework === 'fastify') {
    const app = Fastify({ forceCloseConnections: true });
    await app.register(fastifyIdempotency, options);
    app.post('/orders', async (request, reply) => {
      const code = await work(request.idempotency, reply.raw);
      return reply.code(code).send({ status: code });
    });
    await app.listen({ port: 0, host: '127.0.0.1' });
    return { url: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`, sentWhenFreed, close: () => app.close() };
  }
  if (framework === 'express') {
    const app = express();
    app.use(express.json(), expressIdempotency(options));
    app.post('/orders', async (req, res, next) => {
      try {
        const code = await work(req.idempotency, res);
        res.status(code).json({ status: code });
      } catch (error) {
        next(error);
      }
    });
    app.use(idempotencyErrorHandler());
    server = app.listen(0, '127.0.0.1');
  } else {
    const app = new Koa();
    const router = new Router();
    router.post('/orders', async (ctx) => {
      const code = await work(ctx.state.idempotency, ctx.res);
      ctx.status = code;
      ctx.body = { status: code };
    });
    app.use(bodyParser()).use(koaIdempotency(options)).use(router.routes());
    server = app.listen(0, '127.0.0.1');
  }
  await new Promise((resolve) => server.once('listening', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    sentWhenFreed,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

const count = (key: string): Promise<number> => db.count(key);

describe.each(['express', 'koa', 'fastify'] as const)('%s, transactional, on Postgres', (framework) => {
  it.each([500, 429, 409, 503])('a handler that awaited its transaction and answers %i: rolled back and freed before the answer goes out', async (status) => {
    const app = await start(framework, status);
    try {
      for (let round = 0; round < 3; round++) {
        const key = randomUUID();
        const post = () =>
          fetch(`${app.url}/orders`, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': key }, body: '{}' });
        const first = await post();
        expect(first.status).toBe(status);
        await first.text();
        // Freed before its head went out; on Fastify, as it finished (waited for here: a retry
        // sent in that instant gets 409).
        await vi.waitFor(() => expect(app.sentWhenFreed.has(key)).toBe(true), { timeout: 5_000, interval: 5 });
        expect(app.sentWhenFreed.get(key)).toBe(framework === 'fastify');
        expect(await count(key)).toBe(0);
        const retry = await post();
        expect(retry.status).toBe(201);
        await retry.text();
        expect(await count(key)).toBe(1);
      }
    } finally {
      await app.close();
    }
  });
});
