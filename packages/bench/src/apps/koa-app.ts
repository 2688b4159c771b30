import { bodyParser } from '@koa/bodyparser';
import Router from '@koa/router';
import { idempotency } from '@idemkit/koa';
import Koa from 'koa';
import { createOrderOrHang, createOrderSlowly, type AppContext } from './context.js';

/** Koa 3: body parser, idempotency, router, as @idemkit/koa's README orders them. */
export function koaApp({ library, counters, order, stats }: AppContext): Koa {
  const app = new Koa();
  const router = new Router();
  app.use(async (ctx, next) => {
    if (ctx.method === 'POST') counters.requests++;
    if (ctx.method === 'GET' && ctx.path === '/__stats') {
      ctx.body = stats();
      return;
    }
    await next();
  });
  app.use(bodyParser());
  if (library.kind === 'idemkit') app.use(idempotency({ store: library.store, ttlMs: library.ttlMs, leaseMs: library.leaseMs, storeTimeoutMs: library.storeTimeoutMs, localCache: library.localCache }));
  else if (library.kind !== 'bare') throw new Error(`${library.kind} has no Koa binding in this bench`);
  router.post('/orders', async (ctx) => {
    ctx.status = 201;
    ctx.body = await order(ctx.request.body);
  });
  router.post('/slow', async (ctx) => {
    ctx.status = 201;
    ctx.body = await createOrderSlowly(counters, ctx.request.body);
  });
  router.post('/crash', async (ctx) => {
    ctx.status = 201;
    ctx.body = await createOrderOrHang(counters, ctx.request.headers, ctx.request.body);
  });
  app.use(router.routes());
  app.use(router.allowedMethods());
  return app;
}
