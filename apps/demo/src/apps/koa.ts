import { bodyParser } from '@koa/bodyparser';
import Router from '@koa/router';
import { idempotency } from '@idemkit/koa';
import Koa from 'koa';
import type { Assets } from '../assets.js';
import type { Backend } from '../backend.js';
import { clientError, createThing, forbiddenProperty, getOrder, invalidJson, listOrders, placeOrder, problem, tooLarge, type DemoResponse } from '../checkout.js';
import type { DemoConfig } from '../config.js';
import type { RunningDemo } from '../server.js';
import { listen } from './listen.js';

function send(ctx: Koa.Context, r: DemoResponse): void {
  ctx.status = r.status;
  ctx.set(r.headers);
  ctx.body = r.headers['content-type'] ? Buffer.from(JSON.stringify(r.body)) : r.body;
  if (r.headers['content-type']) ctx.type = r.headers['content-type'];
}

export async function startKoa(config: DemoConfig, backend: Backend, assets: Assets): Promise<RunningDemo> {
  const app = new Koa();
  const router = new Router();
  // Body-parser errors (bad JSON, too large), other exposed 4xx errors (idemkit's 415 for a body
  // no parser read) and a handler's error become problem responses like the other frameworks'.
  app.use(async (ctx, next) => {
    try {
      await next();
    } catch (err) {
      const e = err as { status?: number; type?: string; message?: string; expose?: boolean };
      if (e.status === 413 || e.type === 'entity.too.large') return send(ctx, tooLarge());
      if (err instanceof SyntaxError || e.type === 'entity.parse.failed') return send(ctx, invalidJson(e.message ?? 'Malformed JSON.'));
      if (e.status !== undefined && e.status >= 400 && e.status < 500 && e.expose === true) return send(ctx, clientError(e.status, e.message ?? ''));
      // Anything else (idemkit has already freed the key) is logged by the 'error' listener below
      // and answers the same 500 problem as the other frameworks, not Koa's text/plain one.
      ctx.app.emit('error', err, ctx);
      return send(ctx, problem(500, 'internal', 'Internal error', 'Something went wrong; retry with the same key.'));
    }
  });
  app.use(bodyParser({ enableTypes: ['json'], jsonLimit: '100kb' }));
  // Its parser refuses `__proto__` but not `constructor.prototype`, which Fastify's refuses too.
  app.use(async (ctx, next) => {
    const why = forbiddenProperty(ctx.request.body);
    if (why === undefined) await next();
    else send(ctx, invalidJson(why));
  });
  const guard = idempotency({ store: backend.store, transactional: backend.transactional });

  router.get('/', (ctx) => { ctx.type = 'html'; ctx.body = assets.page; });
  router.get('/vendor/idemkit-client.js', (ctx) => { ctx.type = 'text/javascript'; ctx.body = assets.client; });
  router.get('/orders', async (ctx) => send(ctx, await listOrders(backend)));
  router.get('/orders/:id', async (ctx) => send(ctx, await getOrder(backend, ctx.params.id!)));
  router.post('/orders', guard, async (ctx) => send(ctx, await placeOrder(backend, config.workMs, ctx.request.body, ctx.state.idempotency)));
  router.post('/create', guard, async (ctx) => send(ctx, await createThing(backend, ctx.request.body, ctx.state.idempotency)));
  app.use(router.routes()).use(router.allowedMethods());
  app.on('error', (err: { status?: number }) => { if ((err.status ?? 500) >= 500) console.error(err); });

  return listen(app.callback(), config);
}
