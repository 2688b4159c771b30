import { request as httpRequest } from 'node:http';
import type { AddressInfo } from 'node:net';
import { createMemoryStore, type IdempotencyStore, scopedKey } from '@idemkit/core';
import Fastify, { type FastifyInstance } from 'fastify';
import { afterEach, describe, expect, it } from 'vitest';
import { fastifyIdempotency, type FastifyIdempotencyOptions } from '../src/index.js';

const apps: FastifyInstance[] = [];
afterEach(async () => {
  await Promise.all(apps.splice(0).map((app) => app.close()));
});

interface Answer {
  readonly status: number;
  readonly length: string | undefined;
  readonly replayed: boolean;
  readonly body: string;
}

/** The app on a real socket, HEAD among the covered methods; `ask` sends one request with a key. */
async function listen(
  routes: (app: FastifyInstance) => void,
  options: Partial<FastifyIdempotencyOptions> = {},
): Promise<{ store: IdempotencyStore; ask: (method: string, path: string, key: string) => Promise<Answer> }> {
  const store = createMemoryStore();
  const app = Fastify();
  apps.push(app);
  await app.register(fastifyIdempotency, { store, logger: false, methods: ['POST', 'GET', 'HEAD'], ...options });
  routes(app);
  await app.listen({ port: 0, host: '127.0.0.1' });
  const { port } = app.server.address() as AddressInfo;
  const ask = (method: string, path: string, key: string): Promise<Answer> =>
    new Promise((resolve, reject) => {
      const req = httpRequest({ host: '127.0.0.1', port, path, method, headers: { 'idempotency-key': key } }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('end', () =>
          resolve({
            status: res.statusCode ?? 0,
            length: res.headers['content-length'],
            replayed: res.headers['idempotent-replayed'] === 'true',
            body: Buffer.concat(chunks).toString(),
          }),
        );
      });
      req.on('error', reject);
      req.end();
    });
  return { store, ask };
}

async function storedLength(store: IdempotencyStore, key: string): Promise<string | undefined> {
  const record = await store.get(scopedKey(undefined, key));
  const headers = record?.state === 'completed' && record.response ? record.response.headers : [];
  return headers.find(([name]) => name === 'content-length')?.[1];
}

// SPEC §2: a replay is the original answer, headers included. A HEAD goes out with no body, so its
// Content-Length is no stored body's: it is the one Fastify sent, which differs by route kind.
describe('a HEAD answer replays the Content-Length it went out with', () => {
  it("on a HEAD route of its own: the handler's, with no payload or another payload's length, or none", async () => {
    const { store, ask } = await listen((app) => {
      app.head('/sized', (_request, reply) => {
        reply.header('content-length', 12345).send();
      });
      app.head('/sized-text', (_request, reply) => {
        reply.header('content-length', 12345);
        return 'abc';
      });
      app.head('/text', () => 'abc');
      app.head('/unsized', (_request, reply) => {
        reply.send();
      });
    });
    // What Fastify 5 sends: a HEAD's own Content-Length is kept (onSendEnd), else the payload's.
    const cases: Array<[string, string | undefined]> = [
      ['/sized', '12345'],
      ['/sized-text', '12345'],
      ['/text', '3'],
      ['/unsized', undefined],
    ];
    for (const [path, length] of cases) {
      const first = await ask('HEAD', path, `k${path}`);
      expect([path, first.status, first.length, first.replayed]).toEqual([path, 200, length, false]);
      const again = await ask('HEAD', path, `k${path}`);
      // Before: 0, 3, 3 and 0 (the stored body's length).
      expect([path, again.status, again.length, again.replayed, again.body]).toEqual([path, 200, length, true, '']);
      // None stored unless the handler set one: Fastify works it out from the payload it ends with.
      expect([path, await storedLength(store, `k${path}`)]).toEqual([path, path === '/text' ? undefined : length]);
    }
  });

  it("on a HEAD route of its own whose route-level onSend hook (after ours) rewrites the payload: the rewritten payload's length", async () => {
    const { ask } = await listen((app) => {
      const suffix = (_request: unknown, _reply: unknown, payload: unknown, done: (err: null, value: string) => void): void => done(null, `${String(payload)}xx`);
      app.head('/own', { onSend: suffix }, () => 'abc');
      app.route({ method: ['GET', 'HEAD'], url: '/both', onSend: suffix, handler: () => 'abc' });
    });
    for (const path of ['/own', '/both']) {
      const first = await ask('HEAD', path, `k${path}`);
      expect([path, first.length, first.replayed]).toEqual([path, '5', false]);
      const again = await ask('HEAD', path, `k${path}`);
      // Before: 3, the length of the payload the handler returned, stored before the hook added to it.
      expect([path, again.length, again.replayed, again.body]).toEqual([path, '5', true, '']);
    }
  });

  it('on the HEAD route Fastify made from a GET route: the payload\'s length its own hook set over the handler\'s, stored so', async () => {
    const { store, ask } = await listen((app) => {
      app.get('/sized', (_request, reply) => {
        reply.header('content-length', 12345).send();
      });
      app.get('/sized-text', (_request, reply) => {
        reply.header('content-length', 12345);
        return 'abc';
      });
      app.get('/text', () => 'abc');
    });
    const cases: Array<[string, string]> = [
      ['/sized', '0'],
      ['/sized-text', '3'],
      ['/text', '3'],
    ];
    for (const [path, length] of cases) {
      const first = await ask('HEAD', path, `k${path}`);
      expect([path, first.status, first.length, first.replayed]).toEqual([path, 200, length, false]);
      const again = await ask('HEAD', path, `k${path}`);
      expect([path, again.status, again.length, again.replayed, again.body]).toEqual([path, 200, length, true, '']);
      // The record says what went out (before: no Content-Length stored at all).
      expect([path, await storedLength(store, `k${path}`)]).toEqual([path, length]);
    }
  });

  it("to a retry of another method its record answers (fingerprint: false), the stored body and that body's length", async () => {
    const { ask } = await listen(
      (app) => {
        app.route({
          method: ['GET', 'HEAD'],
          url: '/both',
          handler: (_request, reply) => {
            reply.header('content-length', 12345);
            return 'abc';
          },
        });
      },
      { fingerprint: false },
    );
    expect((await ask('HEAD', '/both', 'k')).length).toBe('12345');
    const get = await ask('GET', '/both', 'k');
    expect([get.replayed, get.length, get.body]).toEqual([true, '3', 'abc']);
  });
});
