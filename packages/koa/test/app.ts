import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { bodyParser } from '@koa/bodyparser';
import Router from '@koa/router';
import type { StartApp, StartAppInput, TestAppHandle } from '@idemkit/http-suite';
import Koa from 'koa';
import { idempotency, type KoaIdempotencyOptions } from '../src/index.js';

/** Reads `application/octet-stream` bodies into a Buffer; @koa/bodyparser then leaves them alone. */
export function rawBody(): Koa.Middleware {
  return async (ctx, next) => {
    if (ctx.is('application/octet-stream') && ctx.request.body === undefined) {
      const chunks: Buffer[] = [];
      for await (const chunk of ctx.req) chunks.push(chunk as Buffer);
      ctx.request.body = Buffer.concat(chunks);
    }
    await next();
  };
}

/** Listen on 127.0.0.1, port 0; `close` also drops keep-alive sockets so tests end promptly. */
export async function listen(app: Koa): Promise<TestAppHandle> {
  const server = app.listen(0, '127.0.0.1');
  await new Promise<void>((resolve, reject) => {
    server.once('listening', resolve);
    server.once('error', reject);
  });
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    close: () =>
      new Promise<void>((resolve, reject) => {
        server.close((err) => (err ? reject(err) : resolve()));
        server.closeAllConnections();
      }),
  };
}

/**
 * The http-suite contract (packages/http-suite/src/contract.ts) on Koa + @koa/router +
 * @koa/bodyparser. `KoaClass` lets the same app run on the lowest Koa of the peer range.
 */
export function createStartApp(KoaClass: typeof Koa = Koa): StartApp {
  return async ({ store, options, counter, txWork, hold, keyFrom }: StartAppInput) => {
    const count = (name: string): number => {
      const n = (counter.get(name) ?? 0) + 1;
      counter.set(name, n);
      return n;
    };
    const router = new Router();

    router.post('/orders', async (ctx) => {
      const n = count('orders');
      const delay = Number(ctx.query.delay ?? 0);
      if (delay > 0) await new Promise((resolve) => setTimeout(resolve, delay));
      if (typeof ctx.query.hold === 'string') await hold(ctx.query.hold);
      const id = randomUUID();
      ctx.status = ctx.query.status === undefined ? 201 : Number(ctx.query.status);
      ctx.set('Location', `/orders/${id}`);
      ctx.set('X-Custom', 'yes');
      ctx.append('Set-Cookie', ['a=1', 'b=2']);
      if (ctx.query.hop === '1') ctx.set({ Connection: 'close, X-Hop', 'X-Hop': '1' });
      ctx.body = { id, n, body: ctx.request.body };
    });
    router.patch('/orders/:id', (ctx) => {
      const n = count('patch');
      ctx.body = { id: ctx.params.id, n, body: ctx.request.body };
    });
    router.get('/orders', (ctx) => {
      ctx.body = { n: count('list') };
    });
    router.post('/binary', (ctx) => {
      count('binary');
      ctx.type = 'application/octet-stream';
      ctx.body = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
    });
    router.post('/text', (ctx) => {
      count('text');
      ctx.type = 'text/plain';
      ctx.body = String(ctx.request.body ?? '');
    });
    router.post('/throw', (ctx) => {
      count('throw');
      const error = new Error('boom');
      // With ?status=<code>, an http-errors style error (ctx.throw's) Koa answers with that code.
      if (typeof ctx.query.status === 'string') throw Object.assign(error, { status: Number(ctx.query.status), expose: true });
      throw error;
    });
    router.post('/stream', (ctx) => {
      count('stream');
      ctx.type = 'text/plain';
      ctx.body = Readable.from(['a', 'b', 'c']);
    });
    router.post('/large', (ctx) => {
      count('large');
      ctx.type = 'application/octet-stream';
      ctx.body = Buffer.alloc(Number(ctx.query.size ?? 0), 0x61);
    });
    router.post('/tx', async (ctx) => {
      count('tx');
      if (!txWork) throw new Error('POST /tx needs txWork');
      const result = await txWork(ctx.state.idempotency?.transaction, ctx.request.body);
      ctx.status = 201;
      ctx.body = result;
    });
    router.post('/create', (ctx) => {
      count('create');
      const { data } = (ctx.request.body ?? {}) as { data?: unknown };
      ctx.status = 201;
      ctx.body = { id: randomUUID(), data };
    });

    const idempotencyOptions: KoaIdempotencyOptions = {
      ...options,
      store,
      scope: (ctx) => ctx.get('x-user') || undefined,
      ...(keyFrom === undefined ? {} : { getKey: (ctx: Koa.Context) => ctx.get(keyFrom) || undefined }),
    };
    const app = new KoaClass();
    app.use(async (ctx, next) => {
      // Set per request before idempotency, as a request-id middleware does.
      // And a CORS header on the transactional route: kept on a rolled-back answer's 503.
      if (ctx.method === 'POST' && ctx.path === '/tx') ctx.set('access-control-allow-origin', 'https://shop.example');
      if (ctx.method === 'POST' && ctx.path === '/orders') {
        const n = String(count('orders:arrived'));
        ctx.set('x-arrival', n);
        if (ctx.get('x-outer-cookie') !== '') ctx.append('Set-Cookie', `arrival=${n}`);
      }
      await next();
    });
    app.silent = true; // the /throw route's error is expected; keep test output clean
    app.use(rawBody());
    app.use(bodyParser({ enableTypes: ['json', 'form', 'text'] }));
    app.use(idempotency(idempotencyOptions));
    app.use(router.routes());
    app.use(router.allowedMethods());
    return listen(app);
  };
}

export const startApp: StartApp = createStartApp();
