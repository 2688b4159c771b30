import { Readable } from 'node:stream';
import { createMemoryStore } from '@idemkit/core';
import type Fastify from 'fastify';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fastifyIdempotency } from '../src/index.js';

type Handler = (request: FastifyRequest, reply: FastifyReply) => Promise<unknown>;

/** Handlers whose first answer must be the same bytes with and without the plugin. */
const CASES: Record<string, Handler> = {
  'object → JSON': async () => ({ b: [1, 2], s: 'é', n: null }),
  'array → JSON': async () => [1, 'x', null],
  'null → "null"': async (_q, reply) => reply.send(null),
  'string → text/plain': async () => 'hello é',
  'vendor JSON type kept': async (_q, reply) => reply.type('application/vnd.api+json').send({ a: 1 }),
  'Buffer → octet-stream': async (_q, reply) => reply.send(Buffer.from([0, 1, 255])),
  'Uint8Array → octet-stream': async (_q, reply) => reply.send(new Uint8Array([7, 8])),
  '204 empty': async (_q, reply) => reply.code(204).send(),
  'redirect': async (_q, reply) => reply.redirect('/elsewhere', 303),
  'headers, cookies, status': async (_q, reply) =>
    reply.code(202).header('x-a', '1').header('set-cookie', ['a=1', 'b=2']).header('cache-control', 'no-store').send({ ok: true }),
  'stream': async (_q, reply) => reply.type('text/plain').send(Readable.from(['a', 'b'])),
  // Plain Fastify writes the answer inside send(): a status or header set after it never goes out.
  'status and headers set after send': async (_q, reply) => {
    reply.code(201).header('set-cookie', 'a=1').send({ ok: true });
    reply.code(500).header('x-late', '1').header('set-cookie', 'late=1');
    return reply;
  },
  'thrown 4xx': async () => {
    throw Object.assign(new Error('nope'), { statusCode: 418 });
  },
};

/**
 * Transparency: for every case, the answer through the plugin (first run, with a key) equals the
 * answer of the same handler on a route that opted out — status, headers (but `date`) and bytes.
 */
export function twinSuite(label: string, create: typeof Fastify): void {
  describe(`${label}: first answers are untouched by the plugin`, () => {
    const app = create();
    beforeAll(async () => {
      await app.register(fastifyIdempotency, { store: createMemoryStore(), logger: false });
      for (const [i, handler] of Object.values(CASES).entries()) {
        app.post(`/on/${i}`, handler);
        app.post(`/off/${i}`, { config: { idempotency: false } }, handler);
      }
      await app.ready();
    });
    afterAll(() => app.close());

    for (const [i, name] of Object.keys(CASES).entries()) {
      it(name, async () => {
        const send = (url: string, key: string) =>
          app.inject({ method: 'POST', url, payload: { q: 1 }, headers: { 'idempotency-key': key } });
        const on = await send(`/on/${i}`, `k${i}`);
        const off = await send(`/off/${i}`, `k${i}`);
        const { date: _a, ...onHeaders } = on.headers;
        const { date: _b, ...offHeaders } = off.headers;
        expect(on.statusCode).toBe(off.statusCode);
        expect(onHeaders).toEqual(offHeaders);
        expect(on.rawPayload.equals(off.rawPayload)).toBe(true);
      });
    }
  });
}
