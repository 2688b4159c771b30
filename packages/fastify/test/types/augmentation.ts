// Type test (compiled, never run): the `declare module 'fastify'` merging the plugin ships.
import { createMemoryStore, type IdempotencyContext } from '@idemkit/core';
import Fastify, { type FastifyRequest } from 'fastify';
import fastifyIdempotency, { type FastifyIdempotencyOptions } from '../../src/index.js';

export async function typed(): Promise<void> {
  const app = Fastify();
  await app.register(fastifyIdempotency, {
    store: createMemoryStore(),
    scope: (request: FastifyRequest) => request.headers['x-tenant'] as string | undefined,
  });

  app.post('/a', { config: { idempotency: { ttlMs: 1000 } } }, async (request) => {
    const ctx: IdempotencyContext | null = request.idempotency;
    return { key: ctx?.key ?? null };
  });
  app.post('/b', { config: { idempotency: false } }, async () => ({}));
  app.post('/c', { config: { idempotency: { required: false, methods: ['POST'], onProblem: (_q, reply, e) => void reply.code(e.status).send() } } }, async () => ({}));

  // @ts-expect-error config.idempotency is overrides or false, never true
  app.post('/d', { config: { idempotency: true } }, async () => ({}));
  // @ts-expect-error ttlMs is a number of milliseconds
  app.post('/e', { config: { idempotency: { ttlMs: '1s' } } }, async () => ({}));
  // @ts-expect-error the store is app-wide, not per route
  app.post('/f', { config: { idempotency: { store: createMemoryStore() } } }, async () => ({}));
  // @ts-expect-error the plugin needs a store
  await app.register(fastifyIdempotency, {});

  app.get('/g', async (request) => {
    // @ts-expect-error the context is read-only to handlers' eyes: it may be null
    const key: string = request.idempotency.key;
    return { key };
  });

  const options: FastifyIdempotencyOptions = { store: createMemoryStore(), onProblem: async () => undefined };
  void options;
}
