import type { AddressInfo } from 'node:net';
import type { Server, ServerResponse } from 'node:http';
import type { IdempotencyContext, IdempotencyOptions } from '@idemkit/core';
import { idempotency as expressIdempotency, idempotencyErrorHandler } from '@idemkit/express';
import fastifyIdempotency from '@idemkit/fastify';
import { idempotency as koaIdempotency } from '@idemkit/koa';
import { bodyParser } from '@koa/bodyparser';
import Router from '@koa/router';
import express from 'express';
import Fastify from 'fastify';
import Koa from 'koa';

export type Framework = 'express' | 'koa' | 'fastify';

/** The engine options these apps take (those with no framework-typed request in them). */
export type OrderOptions = Pick<IdempotencyOptions, 'store' | 'transactional' | 'leaseMs' | 'logger' | 'onEvent'>;

/** What a request's handler does: its work, given the request's context and raw response; it returns the status to answer. */
export type OrderWork = (context: IdempotencyContext | null | undefined, res: ServerResponse) => Promise<number>;

/**
 * `POST /orders` on `framework` over a real socket, each binding mounted as its README says
 * (body parser first; Express with `idempotencyErrorHandler()`), answering `{ status }` with the
 * status `work` returns. Resolves with the URL and a close that drops open connections.
 */
export async function serveOrders(framework: Framework, options: OrderOptions, work: OrderWork): Promise<{ url: string; close(): Promise<void> }> {
  if (framework === 'fastify') {
    const app = Fastify({ forceCloseConnections: true });
    await app.register(fastifyIdempotency, options);
    app.post('/orders', async (request, reply) => {
      const code = await work(request.idempotency, reply.raw);
      return reply.code(code).send({ status: code });
    });
    await app.listen({ port: 0, host: '127.0.0.1' });
    return { url: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`, close: () => app.close() };
  }
  let server: Server;
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
    app.silent = true;
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
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
