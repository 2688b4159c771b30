import fastifyIdempotency from '@idemkit/fastify';
import Fastify, { type FastifyInstance } from 'fastify';
import { nodeIdempotencyFastify } from '../peers/node-idempotency.js';
import { createOrderOrHang, createOrderSlowly, type AppContext } from './context.js';
import { answerBytes } from './probes.js';

/** Fastify 5 with the library registered before the routes, as its README says. */
export async function fastifyApp({ library, counters, order, stats }: AppContext): Promise<FastifyInstance> {
  const app = Fastify({ logger: false });
  app.addHook('onRequest', async (request) => {
    if (request.method === 'POST') counters.requests++;
  });
  app.get('/__stats', async () => stats());
  switch (library.kind) {
    case 'idemkit':
      await app.register(fastifyIdempotency, { store: library.store, ttlMs: library.ttlMs, leaseMs: library.leaseMs, storeTimeoutMs: library.storeTimeoutMs, localCache: library.localCache });
      break;
    case 'node-idempotency':
      nodeIdempotencyFastify(app, library.idempotency);
      break;
    case 'express-idempotency':
      throw new Error('express-idempotency is Express-only');
    case 'probe-hook':
      app.addHook('preHandler', (_request, _reply, done) => done());
      break;
    case 'probe-store': {
      const { keeper } = library;
      app.addHook('onSend', (request, reply, payload, done) => {
        keeper.keep(request.headers['idempotency-key'], reply.statusCode, reply.getHeaders(), answerBytes(payload));
        done(null, payload);
      });
      break;
    }
    case 'bare':
      break;
  }
  app.post('/orders', async (request, reply) => reply.code(201).send(await order(request.body)));
  app.post('/slow', async (request, reply) => reply.code(201).send(await createOrderSlowly(counters, request.body)));
  app.post('/crash', async (request, reply) => reply.code(201).send(await createOrderOrHang(counters, request.headers, request.body)));
  return app;
}
