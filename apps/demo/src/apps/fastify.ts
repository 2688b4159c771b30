import fastifyIdempotency from '@idemkit/fastify';
import Fastify, { type FastifyError, type FastifyReply } from 'fastify';
import type { Assets } from '../assets.js';
import type { Backend } from '../backend.js';
import { clientError, createThing, getOrder, invalidJson, listOrders, placeOrder, problem, tooLarge, type DemoResponse } from '../checkout.js';
import type { DemoConfig } from '../config.js';
import type { RunningDemo } from '../server.js';
import { closeGracefully, urlOf } from './listen.js';

function send(reply: FastifyReply, r: DemoResponse): FastifyReply {
  reply.code(r.status).headers(r.headers);
  return reply.send(r.headers['content-type'] ? JSON.stringify(r.body) : r.body);
}

export async function startFastify(config: DemoConfig, backend: Backend, assets: Assets): Promise<RunningDemo> {
  const app = Fastify({ bodyLimit: 100 * 1024 });
  app.setErrorHandler((err: FastifyError, _req, reply) => {
    if (err.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || err.code === 'FST_ERR_CTP_EMPTY_JSON_BODY' || err instanceof SyntaxError) {
      return send(reply, invalidJson(err.message));
    }
    if (err.code === 'FST_ERR_CTP_BODY_TOO_LARGE') return send(reply, tooLarge());
    // Fastify's own 4xx (415 for a content type it has no parser for, …) as problem+json too.
    if (err.statusCode !== undefined && err.statusCode < 500) return send(reply, clientError(err.statusCode, err.message));
    console.error(err); // not app.log: the demo's Fastify runs without a logger, so that is a no-op
    return send(reply, problem(500, 'internal', 'Internal error', 'Something went wrong; retry with the same key.'));
  });
  await app.register(fastifyIdempotency, { store: backend.store, transactional: backend.transactional });

  app.get('/', { config: { idempotency: false } }, (_req, reply) => reply.type('text/html').send(assets.page));
  app.get('/vendor/idemkit-client.js', (_req, reply) => reply.type('text/javascript').send(assets.client));
  app.get('/orders', async (_req, reply) => send(reply, await listOrders(backend)));
  app.get<{ Params: { id: string } }>('/orders/:id', async (req, reply) => send(reply, await getOrder(backend, req.params.id)));
  app.post('/orders', async (req, reply) => send(reply, await placeOrder(backend, config.workMs, req.body, req.idempotency)));
  app.post('/create', async (req, reply) => send(reply, await createThing(backend, req.body, req.idempotency)));

  await app.listen({ port: config.port, host: config.host });
  const address = app.server.address();
  const port = typeof address === 'object' && address ? address.port : config.port;
  return { url: urlOf(config.host, port), close: () => closeGracefully(app.server, () => app.close()) };
}
