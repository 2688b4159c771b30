import { randomUUID } from 'node:crypto';
import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import type { StartApp, StartAppInput } from '@idemkit/http-suite';
import Fastify, { type FastifyInstance, type FastifyRequest } from 'fastify';
import { fastifyIdempotency } from '../src/index.js';

type Query = Record<string, string | undefined>;

/**
 * The http-suite test app (packages/http-suite/src/contract.ts), on Fastify. `create` lets the
 * same app run on the lowest Fastify of the peer range (test/fastify-5.0.test.ts).
 */
export async function buildApp(
  { store, options, counter, txWork, hold, keyFrom }: StartAppInput,
  create: typeof Fastify = Fastify,
): Promise<FastifyInstance> {
  const app = create();
  const count = (name: string): number => {
    const n = (counter.get(name) ?? 0) + 1;
    counter.set(name, n);
    return n;
  };
  // Raw bodies arrive as Buffers; JSON and text/plain parsers are Fastify's own.
  // Before parsing and idempotency (a preHandler): the suite knows when every duplicate is in.
  app.addHook('onRequest', (request, reply, done) => {
    // Set per request before idempotency, as a request-id middleware does.
    // And a CORS header on the transactional route: kept on a rolled-back answer's 503.
    if (request.method === 'POST' && request.url.split('?')[0] === '/tx') reply.header('access-control-allow-origin', 'https://shop.example');
    if (request.method === 'POST' && request.url.split('?')[0] === '/orders') {
      const n = String(count('orders:arrived'));
      reply.header('x-arrival', n);
      if (request.headers['x-outer-cookie'] !== undefined) reply.header('set-cookie', `arrival=${n}`);
    }
    done();
  });
  app.addContentTypeParser('application/octet-stream', { parseAs: 'buffer' }, (_req, body, done) => done(null, body));

  await app.register(fastifyIdempotency, {
    ...options,
    store,
    scope: (request) => {
      const user = request.headers['x-user'];
      return typeof user === 'string' ? user : undefined;
    },
    ...(keyFrom === undefined
      ? {}
      : {
          getKey: (request: FastifyRequest) => {
            const value = request.headers[keyFrom.toLowerCase()];
            return typeof value === 'string' ? value : undefined;
          },
        }),
  });

  app.post('/orders', async (request, reply) => {
    const q = request.query as Query;
    const n = count('orders');
    if (q.delay !== undefined) await sleep(Number(q.delay));
    if (q.hold !== undefined) await hold(q.hold);
    const id = randomUUID();
    reply
      .code(q.status === undefined ? 201 : Number(q.status))
      .header('location', `/orders/${id}`)
      .header('x-custom', 'yes')
      .header('set-cookie', ['a=1', 'b=2']);
    if (q.hop === '1') reply.header('connection', 'close, X-Hop').header('x-hop', '1');
    return { id, n, body: request.body };
  });
  app.patch('/orders/:id', async (request) => {
    const { id } = request.params as { id: string };
    return { id, n: count('patch'), body: request.body };
  });
  app.get('/orders', async () => ({ n: count('list') }));
  app.post('/binary', async (_request, reply) => {
    count('binary');
    return reply.type('application/octet-stream').send(Buffer.from(Array.from({ length: 256 }, (_, i) => i)));
  });
  app.post('/text', async (request, reply) => {
    count('text');
    return reply.type('text/plain').send(request.body as string);
  });
  app.post('/throw', async (request) => {
    count('throw');
    const error = new Error('boom');
    // With ?status=<code>, an error with a statusCode (as @fastify/sensible's) Fastify answers with that code.
    const { status } = request.query as { status?: string };
    if (status !== undefined) throw Object.assign(error, { statusCode: Number(status) });
    throw error;
  });
  app.post('/stream', async (_request, reply) => {
    count('stream');
    return reply.type('text/plain').send(Readable.from(['a', 'b', 'c']));
  });
  app.post('/large', async (request, reply) => {
    count('large');
    const size = Number((request.query as Query).size);
    return reply.type('application/octet-stream').send(Buffer.alloc(size, 0x61));
  });
  app.post('/tx', async (request, reply) => {
    count('tx');
    if (!txWork) throw new Error('POST /tx needs txWork');
    const result = await txWork(request.idempotency?.transaction, request.body);
    return reply.code(201).send(result);
  });
  app.post('/create', async (request, reply) => {
    count('create');
    const { data } = request.body as { data?: unknown };
    return reply.code(201).send({ id: randomUUID(), data });
  });
  return app;
}

/** `StartApp` for a given Fastify factory: listens on 127.0.0.1, port 0. */
export function createStartApp(create: typeof Fastify = Fastify): StartApp {
  return async (input) => {
    const app = await buildApp(input, create);
    await app.listen({ host: '127.0.0.1', port: 0 });
    const address = app.server.address();
    if (address === null || typeof address === 'string') throw new Error('expected a TCP address');
    return { url: `http://127.0.0.1:${address.port}`, close: () => app.close() };
  };
}

export const startApp: StartApp = createStartApp();
