import { request as httpRequest } from 'node:http';
import { connect } from 'node:net';
import type { AddressInfo, Socket } from 'node:net';
import { Readable } from 'node:stream';
import { gunzipSync } from 'node:zlib';
import fastifyCompress from '@fastify/compress';
import { ConfigurationError, createMemoryStore, type IdempotencyStore, scopedKey } from '@idemkit/core';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest, type LightMyRequestResponse } from 'fastify';
import { afterEach, describe, expect, it, vi } from 'vitest';
import fastifyIdempotencyDefault, { fastifyIdempotency, type FastifyIdempotencyOptions } from '../src/index.js';

const apps: FastifyInstance[] = [];
afterEach(async () => {
  await Promise.all(apps.splice(0).map((app) => app.close()));
});

async function build(
  routes: (app: FastifyInstance) => void,
  options: Partial<FastifyIdempotencyOptions> = {},
): Promise<{ app: FastifyInstance; store: IdempotencyStore }> {
  const store = createMemoryStore();
  const app = Fastify();
  apps.push(app);
  await app.register(fastifyIdempotency, { store, logger: false, ...options });
  routes(app);
  await app.ready();
  return { app, store };
}

function post(app: FastifyInstance, url: string, key?: string, payload: unknown = { a: 1 }): Promise<LightMyRequestResponse> {
  return app.inject({ method: 'POST', url, payload: payload as object, headers: key === undefined ? {} : { 'idempotency-key': key } });
}

const replayed = (res: LightMyRequestResponse): boolean => res.headers['idempotent-replayed'] === 'true';

/** The app on a real socket (client aborts, Fastify's async paths): a POST with a key and a JSON body. */
async function overSocket(app: FastifyInstance): Promise<(path: string, key: string, signal?: AbortSignal) => Promise<Response>> {
  await app.listen({ port: 0, host: '127.0.0.1' });
  const base = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`;
  return (path, key, signal) =>
    fetch(`${base}${path}`, { method: 'POST', headers: { 'idempotency-key': key, 'content-type': 'application/json' }, body: '{"a":1}', signal });
}

/** The client of `send` leaves once `started()` holds (the handler, or a hook, is at work). */
async function leaveEarly(send: (signal: AbortSignal) => Promise<Response>, started: () => boolean): Promise<void> {
  const controller = new AbortController();
  const first = send(controller.signal);
  await vi.waitFor(() => expect(started()).toBe(true), { timeout: 10_000, interval: 5 });
  controller.abort();
  await expect(first).rejects.toThrow();
}

/** Asks again with `key` until the answer has `status` (a lease running out, a late answer stored); returns it. */
/**
 * `handler` on POST `path` (a 400 ms lease), its client leaving once it runs: the retries get
 * 410 `cut-short` a lease later (not 409 for good), and it ran once.
 */
async function cutShortOnceLeft(path: string, handler: (request: FastifyRequest, reply: FastifyReply) => unknown): Promise<void> {
  let runs = 0;
  const { app } = await build(
    (a) => {
      a.post(path, (request, reply) => {
        runs++;
        return handler(request, reply);
      });
    },
    { leaseMs: 400 },
  );
  const send = await overSocket(app);
  await leaveEarly((signal) => send(path, `${path}-key`, signal), () => runs === 1);
  const retry = await answeredWith(app, path, `${path}-key`, 410);
  expect(retry.json()).toMatchObject({ reason: 'cut-short', originalStatus: null });
  expect(runs).toBe(1);
}

/**
 * A handler on POST `path` that throws once its client left, behind the error handling `setup`
 * adds (slower than the lease, or never answering): the key is freed, so the retry runs it again.
 */
async function freedAfterThrowOnceLeft(path: string, leaseMs: number, setup: (app: FastifyInstance) => void): Promise<void> {
  let runs = 0;
  const { app } = await build(
    (a) => {
      setup(a);
      a.post(path, async (_request, reply) => {
        runs++;
        if (runs > 1) return reply.code(201).send({ run: runs });
        await new Promise((resolve) => reply.raw.once('close', resolve));
        throw new Error('card declined');
      });
    },
    { leaseMs },
  );
  const send = await overSocket(app);
  await leaveEarly((signal) => send(path, `${path}-key`, signal), () => runs === 1);
  const retry = await answeredWith(app, path, `${path}-key`, 201, 3_000);
  expect(retry.json()).toEqual({ run: 2 });
  expect(runs).toBe(2);
}

function answeredWith(app: FastifyInstance, path: string, key: string, status: number, timeout = 5_000, payload: unknown = { a: 1 }): Promise<LightMyRequestResponse> {
  return vi.waitFor(
    async () => {
      const res = await post(app, path, key, payload);
      expect(res.statusCode).toBe(status);
      return res;
    },
    { timeout, interval: 50 },
  );
}

describe('registration', () => {
  it('is a fastify-plugin with a name, also the default export', () => {
    expect(fastifyIdempotencyDefault).toBe(fastifyIdempotency);
    const meta = (fastifyIdempotency as unknown as Record<symbol, unknown>)[Symbol.for('plugin-meta')];
    expect(meta).toMatchObject({ name: '@idemkit/fastify', fastify: '5.x' });
  });

  it('rejects bad plugin options at register time, naming the option', async () => {
    const app = Fastify();
    apps.push(app);
    await expect(app.register(fastifyIdempotency, { store: createMemoryStore(), ttlMs: -1 })).rejects.toThrow(/ttlMs/);
    const other = Fastify();
    apps.push(other);
    await expect(other.register(fastifyIdempotency, { store: createMemoryStore(), onProblem: 5 as never })).rejects.toThrow('`onProblem` must be a function.');
  });

  it('covers only routes registered after it: declare routes after `await app.register(...)`', async () => {
    const app = Fastify();
    apps.push(app);
    let runs = 0;
    app.post('/before', async () => ({ n: ++runs }));
    await app.register(fastifyIdempotency, { store: createMemoryStore(), logger: false });
    app.post('/after', async () => ({ n: ++runs }));
    await app.ready();
    expect((await post(app, '/before')).statusCode).toBe(200); // no key needed: not covered
    expect((await post(app, '/after')).statusCode).toBe(400); // key missing
  });

  it('without `await`, a root route declared right after register is not covered (its onRoute hook is not in place yet)', async () => {
    const app = Fastify();
    apps.push(app);
    void app.register(fastifyIdempotency, { store: createMemoryStore(), logger: false });
    app.post('/x', async () => ({ ok: true }));
    app.register(async (child) => {
      child.post('/later', async () => ({ ok: true }));
    });
    await app.ready();
    expect((await post(app, '/x')).statusCode).toBe(200);
    // Routes in plugins registered after it are covered either way (avvio loads in order).
    expect((await post(app, '/later')).statusCode).toBe(400);
  });

  it('covers routes of encapsulated child plugins registered later', async () => {
    const { app } = await build((a) => {
      void a.register(async (child) => {
        child.post('/child', async () => ({ ok: true }));
      }, { prefix: '/v1' });
    });
    expect((await post(app, '/v1/child')).statusCode).toBe(400);
    const first = await post(app, '/v1/child', 'k');
    const again = await post(app, '/v1/child', 'k');
    expect(first.statusCode).toBe(200);
    expect(replayed(again)).toBe(true);
  });
});

describe('route config', () => {
  it('config.idempotency: false leaves the route alone', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/free', { config: { idempotency: false } }, async (request) => ({ n: ++runs, ctx: request.idempotency }));
    });
    const first = await post(app, '/free', 'same');
    const second = await post(app, '/free', 'same');
    expect(first.json()).toEqual({ n: 1, ctx: null });
    expect(second.json()).toEqual({ n: 2, ctx: null });
    expect(replayed(second)).toBe(false);
  });

  it('overrides merge into the plugin options per route', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/optional', { config: { idempotency: { required: false } } }, async () => ({ n: ++runs }));
      a.post('/strict', async () => ({ n: ++runs }));
      a.put('/put', { config: { idempotency: { methods: ['PUT'] } } }, async () => ({ n: ++runs }));
      a.put('/put-default', async () => ({ n: ++runs }));
    });
    expect((await post(app, '/optional')).statusCode).toBe(200);
    expect((await post(app, '/strict')).statusCode).toBe(400);
    // PUT is covered on the route that asked for it, and only there.
    expect((await app.inject({ method: 'PUT', url: '/put', payload: {} })).statusCode).toBe(400);
    expect((await app.inject({ method: 'PUT', url: '/put-default', payload: {} })).statusCode).toBe(200);
    const put = { method: 'PUT' as const, url: '/put', payload: {}, headers: { 'idempotency-key': 'p' } };
    const a = await app.inject(put);
    const b = await app.inject(put);
    expect(replayed(b)).toBe(true);
    expect(b.body).toBe(a.body);
  });

  it('a route override keeps plugin options it does not name (undefined means "not given")', async () => {
    const { app } = await build(
      (a) => {
        a.post('/x', { config: { idempotency: { required: undefined } } }, async () => ({ ok: true }));
      },
      { required: false },
    );
    expect((await post(app, '/x')).statusCode).toBe(200);
  });

  it('a per-route onProblem override is used for that route', async () => {
    const { app } = await build((a) => {
      a.post(
        '/custom',
        {
          config: {
            idempotency: {
              onProblem: (_request, reply, error) => {
                void reply.code(error.status).send({ custom: error.code });
              },
            },
          },
        },
        async () => ({ ok: true }),
      );
    });
    const res = await post(app, '/custom');
    expect(res.statusCode).toBe(400);
    expect(res.json()).toEqual({ custom: 'ERR_IDEMKIT_KEY_MISSING' });
  });

  for (const [label, value] of [
    ['a string', 'yes'],
    ['null', null],
    ['an array', []],
    ['true', true],
    ['a store override', { store: createMemoryStore() }],
    ['an invalid option value', { ttlMs: 0 }],
    // Before, accepted: every problem answer (400, 409, 422, 503) then became a 500.
    ['an onProblem that is no function', { onProblem: 5 }],
  ] as const) {
    it(`throws at startup for ${label}`, async () => {
      const { app } = await build(() => undefined);
      expect(() => app.post('/bad', { config: { idempotency: value as never } }, async () => ({}))).toThrow(ConfigurationError);
    });
  }

  it('names the route whose override core refuses (an empty methods list says how to opt out)', async () => {
    const { app } = await build(() => undefined);
    expect(() => app.post('/payments', { config: { idempotency: { ttlMs: 0 } } }, async () => ({}))).toThrow(/^\[idemkit\] Route POST \/payments: `config\.idempotency`: .*ttlMs/);
    // Before, `methods: []` left the route uncovered without a word; `false` is the way to say so.
    expect(() => app.post('/refunds', { config: { idempotency: { methods: [] } } }, async () => ({}))).toThrow(
      /Route POST \/refunds: `config\.idempotency`: `methods` is empty.*config: \{ idempotency: false \}/,
    );
  });

  it('a bad config in a plugin registered later rejects ready()', async () => {
    const app = Fastify();
    apps.push(app);
    await app.register(fastifyIdempotency, { store: createMemoryStore(), logger: false });
    void app.register(async (child) => {
      child.post('/bad', { config: { idempotency: 5 as never } }, async () => ({}));
    });
    await expect(app.ready()).rejects.toThrow(/config\.idempotency/);
  });
});

describe('request.idempotency', () => {
  it('is the lease context while the handler runs, null otherwise (never a shared object)', async () => {
    const { app } = await build(
      (a) => {
        a.post('/ctx', async (request) => ({ ctx: request.idempotency }));
        a.get('/ctx', async (request) => ({ ctx: request.idempotency }));
      },
      { required: false },
    );
    expect((await post(app, '/ctx', 'k1')).json()).toEqual({ ctx: { key: 'k1', tookOver: false } });
    expect((await post(app, '/ctx')).json()).toEqual({ ctx: null });
    expect((await app.inject({ method: 'GET', url: '/ctx' })).json()).toEqual({ ctx: null });
    // A replay does not run the handler, and the next request starts from null again.
    expect(replayed(await post(app, '/ctx', 'k1'))).toBe(true);
    expect((await post(app, '/ctx', 'k2')).json()).toEqual({ ctx: { key: 'k2', tookOver: false } });
  });
});

describe('payloads', () => {
  it('an object reply is stored as the string Fastify serialised, so the replay is byte-exact', async () => {
    const { app } = await build((a) => {
      a.post(
        '/schema',
        {
          schema: {
            response: { 201: { type: 'object', properties: { z: { type: 'number' }, a: { type: 'string' } } } },
          },
        },
        async (_request, reply) => reply.code(201).send({ z: 1.5, a: 'é', dropped: 'by the response schema' }),
      );
    });
    const first = await post(app, '/schema', 'k');
    const again = await post(app, '/schema', 'k');
    expect(first.body).toBe('{"z":1.5,"a":"é"}');
    expect(again.rawPayload.equals(first.rawPayload)).toBe(true);
    expect(again.statusCode).toBe(201);
    expect(again.headers['content-type']).toBe(first.headers['content-type']);
    expect(again.headers['content-length']).toBe(first.headers['content-length']);
    expect(replayed(again)).toBe(true);
  });

  it('string and Buffer payloads replay byte-exact with their headers', async () => {
    const bytes = Buffer.from([0, 255, 1, 254, 0x0a]);
    const { app } = await build((a) => {
      a.post('/string', async (_request, reply) => reply.type('text/csv; charset=utf-8').header('x-a', 'b').send('a,b\n1,€\n'));
      a.post('/buffer', async (_request, reply) => reply.type('application/x-thing').send(bytes));
    });
    for (const url of ['/string', '/buffer']) {
      const first = await post(app, url, `k${url}`);
      const again = await post(app, url, `k${url}`);
      expect(replayed(again)).toBe(true);
      expect(again.rawPayload.equals(first.rawPayload)).toBe(true);
      expect(again.headers['content-type']).toBe(first.headers['content-type']);
    }
    expect((await post(app, '/buffer', 'k/buffer')).rawPayload.equals(bytes)).toBe(true);
    expect((await post(app, '/string', 'k/string')).headers['x-a']).toBe('b');
  });

  it('an empty reply (204, no payload) replays as an empty 204 without an invented content-type', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/empty', async (_request, reply) => {
        runs++;
        return reply.code(204).send();
      });
    });
    const first = await post(app, '/empty', 'k');
    const again = await post(app, '/empty', 'k');
    expect(first.statusCode).toBe(204);
    expect(again.statusCode).toBe(204);
    expect(again.body).toBe('');
    expect(replayed(again)).toBe(true);
    expect(again.headers['content-type']).toBeUndefined();
    expect(runs).toBe(1);
  });

  it.each([
    ["send('')", () => ''],
    ['send(Buffer.alloc(0))', () => Buffer.alloc(0)],
    // Before: stored as not bufferable, so the retry got 410 (Koa stores such a 204 as empty too).
    ['a Node stream', () => Readable.from(['abc'])],
    ['a web ReadableStream', () => ReadableStream.from([new Uint8Array([1, 2])])],
  ] as Array<[string, () => unknown]>)('a 204 sent with a payload Fastify drops, %s, replays as the empty 204 that went out', async (_name, payload) => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/empty', async (_request, reply) => {
        runs++;
        return reply.code(204).send(payload());
      });
    });
    const first = await post(app, '/empty', 'k');
    const again = await post(app, '/empty', 'k');
    expect(first.statusCode).toBe(204);
    expect(first.headers['content-type']).toBeUndefined();
    expect(replayed(again)).toBe(true);
    expect(again.statusCode).toBe(204);
    expect(again.headers['content-type']).toBeUndefined();
    expect(runs).toBe(1);
  });

  it.each([
    ['a Node stream', () => Readable.from(['abc'])],
    ['a web ReadableStream', () => ReadableStream.from([new Uint8Array([1, 2])])],
  ] as Array<[string, () => unknown]>)('a 304 sent with %s (Node writes none of it) replays as the empty 304 that went out', async (_name, payload) => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/unchanged', async (_request, reply) => {
        runs++;
        return reply.code(304).header('etag', '"v1"').send(payload());
      });
    });
    const first = await post(app, '/unchanged', 'k');
    const again = await post(app, '/unchanged', 'k');
    expect(first.statusCode).toBe(304);
    // Before: stored as not bufferable, so the retry got 410 (Express and Koa replay it).
    expect(replayed(again)).toBe(true);
    expect(again.statusCode).toBe(304);
    expect(again.headers['etag']).toBe('"v1"');
    expect(again.headers['content-length']).toBe(first.headers['content-length']);
    expect(again.body).toBe('');
    expect(runs).toBe(1);
  });

  it('a stream is delivered unchanged; the retry gets 410 and the handler never runs again', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/stream', async (_request, reply) => {
        runs++;
        return reply.type('text/plain').send(Readable.from(['x', 'y']));
      });
    });
    const first = await post(app, '/stream', 'k');
    expect(first.body).toBe('xy');
    const again = await post(app, '/stream', 'k');
    expect(again.statusCode).toBe(410);
    expect(again.json()).toMatchObject({ code: 'ERR_IDEMKIT_RESPONSE_NOT_REPLAYABLE', reason: 'not-bufferable', originalStatus: 200 });
    expect(runs).toBe(1);
  });

  it('a hijacked reply (written to reply.raw) is never re-run: the retry gets 410', async () => {
    let runs = 0;
    const { app, store } = await build((a) => {
      a.post('/raw', async (_request, reply) => {
        runs++;
        reply.hijack();
        reply.raw.writeHead(202, { 'content-type': 'text/plain' });
        reply.raw.end('raw');
      });
    });
    const first = await post(app, '/raw', 'k');
    expect(first.statusCode).toBe(202);
    expect(first.body).toBe('raw');
    // onSend never runs for a hijacked reply: the marker is stored from onResponse, after the fact.
    await vi.waitFor(async () => expect((await store.get(scopedKey(undefined, 'k')))?.state).toBe('completed'), { timeout: 10_000 });
    const again = await post(app, '/raw', 'k');
    expect(again.statusCode).toBe(410);
    expect(again.json()).toMatchObject({ originalStatus: 202, reason: 'not-bufferable' });
    expect(runs).toBe(1);
  });
});

describe('a body its content-type parser left unread', () => {
  // A parser that leaves the payload for the handler to stream (`done(null)`: uploads, proxying).
  // Was: fingerprinted as an empty body, so another upload under the same key got the first
  // one's 201 with Idempotent-Replayed; Express and Koa answer such a body 415.
  async function uploads(options: Partial<FastifyIdempotencyOptions> = {}) {
    const stored: string[] = [];
    const warn = vi.fn();
    const { app } = await build(
      (a) => {
        a.addContentTypeParser(['application/x-upload', 'application/x-upload+json'], (_request, _payload, done) => done(null));
        a.post('/upload', async (request, reply) => {
          let bytes = '';
          for await (const chunk of request.raw) bytes += String(chunk);
          stored.push(bytes);
          return reply.code(201).send({ stored: bytes });
        });
      },
      { logger: { warn, error: vi.fn() }, ...options },
    );
    const send = (payload: string, key?: string, type = 'application/x-upload') =>
      app.inject({ method: 'POST', url: '/upload', payload, headers: { 'content-type': type, ...(key === undefined ? {} : { 'idempotency-key': key }) } });
    return { send, stored, warn };
  }

  it('is refused with 415 naming the fix when the request has a key, and the handler never runs', async () => {
    const { send, stored, warn } = await uploads();
    for (const payload of ['file A', 'file B, another one']) {
      const res = await send(payload, 'up-1');
      expect(res.statusCode).toBe(415);
      expect(res.json()).toMatchObject({ code: 'ERR_IDEMKIT_BODY_NOT_PARSED' });
      expect(res.json().message).toContain("parseAs: 'buffer'");
      expect(res.headers['idempotent-replayed']).toBeUndefined();
    }
    expect(stored).toEqual([]);
    expect(warn).toHaveBeenCalledTimes(1);
  });

  it('goes through unfingerprinted without a key when keys are optional; a JSON body left unread is warned about once', async () => {
    const { send, stored, warn } = await uploads({ required: false });
    expect((await send('file A')).statusCode).toBe(201);
    expect((await send('file A')).statusCode).toBe(201);
    expect(stored).toEqual(['file A', 'file A']);
    expect(warn).not.toHaveBeenCalled();
    // JSON may hold the key field (`idempotencyKey`), which nobody read: said once.
    for (let i = 0; i < 2; i++) expect((await send('{"idempotencyKey":"k-in-body"}', undefined, 'application/x-upload+json')).statusCode).toBe(201);
    expect(stored).toHaveLength(4);
    expect(warn).toHaveBeenCalledTimes(1);
    expect(String(warn.mock.calls[0]?.[0])).toMatch(/\[fastify\].*went through with its body unread/);
  });

  it('runs and replays with a fingerprint that does not read the body and no body key', async () => {
    const { send, stored } = await uploads({ fingerprint: (request: FastifyRequest) => String(request.headers['content-length']), bodyField: false });
    expect((await send('file A', 'up-2')).statusCode).toBe(201);
    const again = await send('file A', 'up-2');
    expect(again.statusCode).toBe(201);
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect(stored).toEqual(['file A']);
  });
});

describe('with @fastify/compress', () => {
  it.each(['before', 'after'] as const)(
    'registered %s the plugin: the uncompressed answer is stored, and every replay is compressed as its request asks',
    async (order) => {
      // compress turns a payload over its threshold into a gzip stream in a route-level onSend
      // hook. Stored after it, every such answer would be unbufferable: retries would get 410.
      let runs = 0;
      const store = createMemoryStore();
      const app = Fastify();
      apps.push(app);
      if (order === 'before') await app.register(fastifyCompress, { threshold: 1024 });
      await app.register(fastifyIdempotency, { store, logger: false });
      if (order === 'after') await app.register(fastifyCompress, { threshold: 1024 });
      const items = Array.from({ length: 200 }, (_, i) => ({ sku: `SKU-${i}`, qty: i }));
      app.post('/big', async (_request, reply) => reply.code(201).send({ run: ++runs, items }));
      await app.ready();
      const send = (encoding?: string) =>
        app.inject({ method: 'POST', url: '/big', payload: { a: 1 }, headers: { 'idempotency-key': `compress-${order}`, ...(encoding ? { 'accept-encoding': encoding } : {}) } });
      const expected = JSON.stringify({ run: 1, items });

      const first = await send('gzip');
      expect(first.statusCode).toBe(201);
      expect(first.headers['content-encoding']).toBe('gzip');
      expect(gunzipSync(first.rawPayload).toString()).toBe(expected);

      const replay = await send('gzip');
      expect(replay.statusCode).toBe(201);
      expect(replayed(replay)).toBe(true);
      expect(replay.headers['content-encoding']).toBe('gzip');
      expect(gunzipSync(replay.rawPayload).toString()).toBe(expected);

      const plain = await send();
      expect(replayed(plain)).toBe(true);
      expect(plain.headers['content-encoding']).toBeUndefined();
      expect(plain.body).toBe(expected);
      expect(runs).toBe(1);
    },
  );
});

describe('a hijacked reply that never ends', () => {
  it.each(['throws', 'waits'] as const)(
    'the handler writes part of it and %s, the client gives up: settled, and never run again',
    async (how) => {
      // Fastify only logs the error of a hijacked reply (no onError) and, the body being read,
      // reports no request abort; onResponse needs a finished response. Before the raw
      // response's 'close' was watched, the lease was renewed for as long as the process lived
      // (every retry a 409). A handler still waiting on something may yet do its work, so the
      // key is not freed for a second run either: retries get 410.
      let runs = 0;
      const { app, store } = await build(
        (a) => {
          a.post('/partial', async (_request, reply) => {
            runs++;
            reply.hijack();
            reply.raw.writeHead(200, { 'content-type': 'text/plain' });
            reply.raw.write('part');
            if (how === 'throws') throw new Error('after a partial write');
            await new Promise(() => undefined);
          });
        },
        { leaseMs: 600 },
      );
      await app.listen({ port: 0, host: '127.0.0.1' });
      const { port } = app.server.address() as AddressInfo;
      const k = `hijack-${how}`;
      const req = httpRequest({ host: '127.0.0.1', port, method: 'POST', path: '/partial', headers: { 'idempotency-key': k, 'content-type': 'application/json' } });
      const firstChunk = new Promise<string>((resolve, reject) => {
        req.on('response', (res) => res.once('data', (chunk: Buffer) => resolve(chunk.toString())));
        req.on('error', reject);
      });
      req.end('{"a":1}');
      expect(await firstChunk).toBe('part');
      expect((await store.get(scopedKey(undefined, k)))?.state).toBe('in_progress');
      req.destroy(); // the client gives up
      await vi.waitFor(async () => expect((await store.get(scopedKey(undefined, k)))?.state).toBe('completed'), { timeout: 5_000, interval: 20 });
      const retry = await post(app, '/partial', k);
      expect(retry.statusCode).toBe(410);
      expect(retry.json()).toMatchObject({ reason: 'not-bufferable', originalStatus: 200 });
      expect(runs).toBe(1);
    },
  );
});

describe('a hijacked reply that sends nothing', () => {
  it('the client gives up before any status went out: 410 cut-short with no status, never run again', async () => {
    let runs = 0;
    // A storable() that refuses Node's default 200: the placeholder status must not decide.
    const { app, store } = await build(
      (a) => {
        a.post('/silent', async (_request, reply) => {
          runs++;
          reply.hijack();
          await new Promise(() => undefined); // waits on an upstream that never answers
        });
      },
      { storable: (status) => status === 201 },
    );
    await app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = app.server.address() as AddressInfo;
    const req = httpRequest({ host: '127.0.0.1', port, method: 'POST', path: '/silent', headers: { 'idempotency-key': 'silent', 'content-type': 'application/json' } });
    req.on('error', () => undefined);
    req.end('{"a":1}');
    await vi.waitFor(() => expect(runs).toBe(1), { timeout: 10_000 });
    req.destroy();
    await vi.waitFor(async () => expect((await store.get(scopedKey(undefined, 'silent')))?.state).toBe('completed'), { timeout: 5_000, interval: 20 });
    const retry = await post(app, '/silent', 'silent');
    expect(retry.statusCode).toBe(410);
    expect(retry.json()).toMatchObject({ reason: 'cut-short', originalStatus: null });
    expect(runs).toBe(1);
  });
});

describe('an async handler that calls reply.send() without returning reply', () => {
  // Fastify sends the handler's undefined result too, while the first answer is still being
  // stored. Before, that empty second answer went out first, and the first one's write then
  // threw ERR_HTTP_HEADERS_SENT as an unhandled rejection (a crash under Node's defaults).
  it.each([
    ['sends once', 'once'],
    ['sends twice', 'twice'],
    ['sends, then throws', 'throws'],
  ] as const)('%s: the client gets the first answer, the one stored and replayed', async (_title, how) => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/orders', async (_request, reply) => {
        runs++;
        await new Promise((resolve) => setImmediate(resolve));
        reply.code(201).send({ id: runs, first: true });
        if (how === 'twice') reply.code(202).send({ id: runs, first: false });
        if (how === 'throws') throw new Error('after the answer');
      });
    });
    const overTcp = await overSocket(app);
    const send = () => overTcp('/orders', `no-return-${how}`);
    const first = await send();
    expect(first.status).toBe(201);
    expect(await first.text()).toBe('{"id":1,"first":true}');
    const retry = await send();
    expect(retry.status).toBe(201);
    expect(retry.headers.get('idempotent-replayed')).toBe('true');
    expect(await retry.text()).toBe('{"id":1,"first":true}');
    expect(runs).toBe(1);
  });
});

describe('answers Fastify itself refuses', () => {
  it('reply.send(new Error()) without returning reply answers as plain Fastify does (no crash); the retry runs again', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/bad', async (_request, reply) => {
        runs++;
        await new Promise((resolve) => setImmediate(resolve));
        reply.code(400).send(new Error('bad input'));
      });
    });
    // Before, Fastify's "send inside onError" error escaped as an unhandled rejection (a crash).
    const escaped: unknown[] = [];
    const onRejection = (reason: unknown): void => void escaped.push(reason);
    process.on('unhandledRejection', onRejection);
    try {
      const first = await post(app, '/bad', 'send-error');
      expect(first.statusCode).toBe(400);
      expect(first.json()).toMatchObject({ message: 'bad input' });
      const retry = await post(app, '/bad', 'send-error');
      expect(retry.statusCode).toBe(400);
      expect(replayed(retry)).toBe(false);
      expect(runs).toBe(2);
      await new Promise((resolve) => setImmediate(resolve));
      expect(escaped).toEqual([]);
    } finally {
      process.off('unhandledRejection', onRejection);
    }
  });

  it('an object sent with a content-type Fastify does not serialise: its 500 frees the key, not a 410 forever', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/mistyped', async (_request, reply) => {
        runs++;
        return reply.type('text/plain').send({ a: 1 });
      });
    });
    expect((await post(app, '/mistyped', 'mistyped')).statusCode).toBe(500);
    expect((await post(app, '/mistyped', 'mistyped')).statusCode).toBe(500);
    expect(runs).toBe(2);
  });
});

describe('an async handler whose client left', () => {
  it('resolving with nothing (no send) settles the key instead of renewing it for good: 410 once a lease passed', async () => {
    let runs = 0;
    let ended = false;
    const { app } = await build(
      (a) => {
        a.post('/later', async (_request, reply) => {
          runs++;
          await new Promise((resolve) => setTimeout(resolve, 200));
          reply.code(202); // no send: Fastify would send the empty answer, but the client is gone
          ended = true;
        });
      },
      { leaseMs: 400 },
    );
    const send = await overSocket(app);
    await leaveEarly((signal) => send('/later', 'left', signal), () => runs === 1);
    await vi.waitFor(() => expect(ended).toBe(true), { timeout: 10_000 });
    // Before, the lease was renewed for as long as the process ran: a 409 forever. Now the
    // handler's answer gets a lease's time to come (one that returned reply may answer late).
    const retry = await answeredWith(app, '/later', 'left', 410);
    expect(retry.json()).toMatchObject({ reason: 'cut-short', originalStatus: null });
    expect(runs).toBe(1);
  });

  it('never finishing (hung on a call that never returns): 410 cut-short a lease after the client left, not 409 for good, never a second run', async () => {
    // Before, the lease was renewed while the handler hung: every retry got 409, for good.
    await cutShortOnceLeft('/hangs', async () => {
      await new Promise(() => undefined);
    });
  });

  // An error reporter's onError hook (app-wide, so it runs before ours) that takes longer than a
  // lease: the throw is not yet known to ours when the timer fires. It must still free the key,
  // as the throw's answer does, not mark it cut-short (410 to every retry, which can never run).
  it('throwing after its client left, into an app-wide onError hook slower than a lease: the key is freed, the retry runs', async () => {
    await freedAfterThrowOnceLeft('/reported', 300, (a) => {
      a.addHook('onError', async () => {
        await new Promise((resolve) => setTimeout(resolve, 900)); // reporting the error, slowly
      });
    });
  });

  // Was: a value (or a throw) from the handler cleared the timer, on the word that Fastify sends
  // it. Fastify sends nothing for a reply hijacked meanwhile, and an error goes to an error
  // handler that may never answer: either held the key for good (409 to every retry).
  it('hijacking the reply after its client left, then resolving with a value: 410 cut-short a lease later, not 409 for good', async () => {
    await cutShortOnceLeft('/hijacks', async (_request, reply) => {
      await new Promise((resolve) => reply.raw.once('close', resolve));
      reply.hijack();
      return { late: true };
    });
  });

  it('throwing after its client left into an error handler that never answers: the key is freed a lease later, and the retry runs', async () => {
    await freedAfterThrowOnceLeft('/throws-late', 400, (a) => {
      a.setErrorHandler(async () => {
        await new Promise(() => undefined); // an error reporter that hangs
      });
    });
  });

  // Was: only a handler that returned a promise was watched; a callback-style one (no async, no
  // return: it calls reply.send() from its callback, as Fastify's docs show) whose callback never
  // came held its key for good once its client left: 409 to every retry, its lease renewed.
  it('a callback-style handler (not async) whose callback never comes: 410 cut-short a lease after the client left, not 409 for good', async () => {
    await cutShortOnceLeft('/callback-hangs', (_request, reply) => {
      new Promise<never>(() => undefined).then(() => reply.send({ never: true })); // a driver callback that never comes
    });
  });

  it('a callback-style handler (not async) that answers soon after its client left: that answer is stored and replayed', async () => {
    let runs = 0;
    const { app } = await build(
      (a) => {
        a.post('/callback-late', (_request, reply) => {
          runs++;
          setTimeout(() => void reply.code(201).send({ done: runs }), 150);
        });
      },
      { leaseMs: 2_000 },
    );
    const send = await overSocket(app);
    await leaveEarly((signal) => send('/callback-late', 'callback-late', signal), () => runs === 1);
    const retry = await answeredWith(app, '/callback-late', 'callback-late', 201, 3_000);
    expect(replayed(retry)).toBe(true);
    expect(retry.json()).toEqual({ done: 1 });
    expect(runs).toBe(1);
  });

  it('returning reply and answering later (a timer) after the client left: that answer is stored and replayed', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/callback', async (_request, reply) => {
        runs++;
        setTimeout(() => void reply.code(201).send({ done: runs }), 150);
        return reply;
      });
    });
    const send = await overSocket(app);
    await leaveEarly((signal) => send('/callback', 'callback', signal), () => runs === 1);
    // The handler's promise resolves (through reply) when the client leaves; its answer comes later.
    const retry = await answeredWith(app, '/callback', 'callback', 201, 3_000);
    expect(replayed(retry)).toBe(true);
    expect(retry.json()).toEqual({ done: 1 });
    expect(runs).toBe(1);
  });
});

describe('a client that leaves early, at other moments', () => {
  it('during a slow hook before ours: the lease is still settled once the handler has run', async () => {
    let entered = false;
    let runs = 0;
    const { app } = await build(
      (a) => {
        a.post('/slow-hooks', { preHandler: async () => void (entered = true, await new Promise((resolve) => setTimeout(resolve, 200))) }, async (_request, reply) => {
          runs++;
          reply.code(202); // answers nothing, so nothing reaches onSend
        });
      },
      { leaseMs: 300 },
    );
    const overTcp = await overSocket(app);
    await leaveEarly((signal) => overTcp('/slow-hooks', 'slow-hooks', signal), () => entered);
    // 'close' came before our preHandler listened for it. Before, a 409 for good.
    await answeredWith(app, '/slow-hooks', 'slow-hooks', 410);
    expect(runs).toBe(1);
  });

  // Was: a handler that hijacked its reply and then threw at once reached no onError (Fastify
  // only logs that) and never counted as run, so the close only marked the request closed early:
  // the key was renewed for the life of the process, 409 to every retry.
  it.each([
    ['with the client still there', false],
    ['after the client left during a slow hook after ours', true],
  ])('a sync handler that hijacks and then throws frees its key, %s', async (_when, hookFirst) => {
    let entered = false;
    let runs = 0;
    const { app } = await build(
      (a) => {
        if (hookFirst) {
          a.addHook('onRoute', (route) => {
            route.preHandler = [...([route.preHandler ?? []].flat() as never[]), async () => void (entered = true, await new Promise((resolve) => setTimeout(resolve, 200)))];
          });
        }
        a.post('/hijack-throws', (_request, reply) => {
          runs++;
          if (runs > 1) return reply.code(201).send({ run: runs });
          reply.hijack();
          throw new Error('upgrade failed');
        });
      },
      { leaseMs: 300 },
    );
    const overTcp = await overSocket(app);
    await leaveEarly((signal) => overTcp('/hijack-throws', 'hijack-throws', signal), () => (hookFirst ? entered : runs === 1));
    const retry = await answeredWith(app, '/hijack-throws', 'hijack-throws', 201, 2_000);
    expect(retry.json()).toEqual({ run: 2 });
    expect(runs).toBe(2);
  });

  it('a sync handler that answers on its hijacked reply and then throws keeps that answer: never run again, as an async one', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/answered-then-threw', (_request, reply) => {
        runs++;
        reply.hijack();
        reply.raw.writeHead(202, { 'content-type': 'text/plain' });
        reply.raw.end('accepted');
        throw new Error('bookkeeping failed after the answer');
      });
    });
    const overTcp = await overSocket(app);
    expect((await overTcp('/answered-then-threw', 'answered-then-threw')).status).toBe(202);
    const retry = await answeredWith(app, '/answered-then-threw', 'answered-then-threw', 410);
    expect(retry.json()).toMatchObject({ reason: 'not-bufferable', originalStatus: 202 });
    expect(runs).toBe(1);
  });

  it('during a slow hook after ours, before the handler ran: settled once it has', async () => {
    let entered = false;
    let runs = 0;
    const { app } = await build(
      (a) => {
        // A plugin registered after idemkit adds its route preHandler after ours (rate limiting, say).
        a.addHook('onRoute', (route) => {
          route.preHandler = [...([route.preHandler ?? []].flat() as never[]), async () => void (entered = true, await new Promise((resolve) => setTimeout(resolve, 200)))];
        });
        a.post('/later-hook', async (_request, reply) => {
          runs++;
          reply.code(202);
        });
      },
      { leaseMs: 300 },
    );
    const overTcp = await overSocket(app);
    await leaveEarly((signal) => overTcp('/later-hook', 'later-hook', signal), () => entered);
    await answeredWith(app, '/later-hook', 'later-hook', 410);
    expect(runs).toBe(1);
  });

  it('while a slow preSerialization hook works on a returned value: that value is stored, not a 410', async () => {
    let runs = 0;
    const { app } = await build(
      (a) => {
        a.post('/slow-serialize', { preSerialization: async (_request, _reply, payload: unknown) => (await new Promise((resolve) => setTimeout(resolve, 600)), payload) }, async () => ({ v: ++runs }));
      },
      { leaseMs: 300 },
    );
    const overTcp = await overSocket(app);
    await leaveEarly((signal) => overTcp('/slow-serialize', 'slow-serialize', signal), () => runs === 1);
    const retry = await answeredWith(app, '/slow-serialize', 'slow-serialize', 200);
    expect(replayed(retry)).toBe(true);
    expect(retry.json()).toEqual({ v: 1 });
    expect(runs).toBe(1);
  });

  it('from a non-async handler that hijacks and returns reply: no crash, never run again', async () => {
    let runs = 0;
    const crashed: unknown[] = [];
    const onCrash = (error: unknown): void => void crashed.push(error);
    process.on('uncaughtException', onCrash);
    try {
      const { app } = await build((a) => {
        a.post('/hijack-sync', (_request, reply) => {
          runs++;
          reply.hijack();
          setTimeout(() => reply.raw.end(), 300); // too late: the client is gone
          return reply;
        });
      });
      const overTcp = await overSocket(app);
      await leaveEarly((signal) => overTcp('/hijack-sync', 'hijack-sync', signal), () => runs === 1);
      await answeredWith(app, '/hijack-sync', 'hijack-sync', 410, 3_000);
      expect(crashed).toEqual([]);
      expect(runs).toBe(1);
    } finally {
      process.off('uncaughtException', onCrash);
    }
  });
});

/** A keyed POST with a `{}` body, as raw bytes for a socket (pipelined requests). */
function rawPost(path: string, key: string): string {
  return `POST ${path} HTTP/1.1\r\nHost: x\r\nIdempotency-Key: ${key}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}`;
}

describe('a pipelined request whose connection dies while it waits its turn', () => {
  it('is settled all the same (Node never closes a response still queued behind another)', async () => {
    let runs = 0;
    const { app } = await build(
      (a) => {
        a.post('/first', async () => (await new Promise((resolve) => setTimeout(resolve, 200)), { first: true }));
        a.post('/queued', async (_request, reply) => {
          runs++;
          await new Promise((resolve) => setTimeout(resolve, 250));
          reply.code(202); // answers nothing: Fastify sends the empty answer, but the socket is gone
        });
      },
      // Not shorter: an event loop stalled past the lease (a loaded machine) loses it to the retry.
      { leaseMs: 1_000 },
    );
    await app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = app.server.address() as AddressInfo;
    const socket = connect(port, '127.0.0.1');
    socket.on('error', () => undefined);
    socket.write(rawPost('/first', 'pipelined-1') + rawPost('/queued', 'pipelined-2'));
    await vi.waitFor(() => expect(runs).toBe(1), { timeout: 10_000 });
    socket.destroy();
    // Before, its key answered 409 for as long as the process ran.
    await answeredWith(app, '/queued', 'pipelined-2', 410, 10_000, {});
    expect(runs).toBe(1);
  });
});

describe('a pipelined request whose connection dies while its handler hangs', () => {
  // Node never closes a response queued behind another when the connection dies: the socket's
  // close stands in, and a handler hung on it (an upstream call that never returns) has its key
  // marked a lease later (the case Koa's binding missed).
  it('is marked cut-short a lease later, not held for good', async () => {
    let runs = 0;
    const { app } = await build(
      (a) => {
        a.post('/first', async () => new Promise<never>(() => undefined));
        a.post('/queued', async () => {
          runs++;
          return new Promise<never>(() => undefined);
        });
      },
      { leaseMs: 300 },
    );
    await app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = app.server.address() as AddressInfo;
    const socket = connect(port, '127.0.0.1');
    socket.on('error', () => undefined);
    socket.write(rawPost('/first', 'hung-piped-1') + rawPost('/queued', 'hung-piped-2'));
    await vi.waitFor(() => expect(runs).toBe(1), { timeout: 10_000 });
    socket.destroy();
    const retry = await answeredWith(app, '/queued', 'hung-piped-2', 410, 5_000, {});
    expect(retry.json()).toMatchObject({ reason: 'cut-short' });
    expect(runs).toBe(1);
  });
});

describe('a pipelined request whose connection died before its key was even claimed', () => {
  for (const answer of ['send', 'hijack'] as const) {
    it(`is settled all the same (${answer}): the socket's close came before anyone could wait for it`, async () => {
      let runs = 0;
      let socketClosed: Promise<unknown> = Promise.resolve();
      const store = createMemoryStore();
      const begin = store.begin.bind(store);
      // The claim answers only once the connection is gone (a slow store, a client that gave up).
      store.begin = async (...args) => (await socketClosed, begin(...args));
      const { app } = await build(
        (a) => {
          a.post('/first', async () => (await new Promise((resolve) => setTimeout(resolve, 300)), { first: true }));
          a.post('/queued', async (_request, reply) => {
            runs++;
            if (answer === 'send') return reply.code(201).send({ runs });
            reply.hijack();
            reply.raw.writeHead(201, { 'content-type': 'application/json' });
            reply.raw.end(JSON.stringify({ runs }));
          });
        },
        { store, leaseMs: 300 },
      );
      await app.listen({ port: 0, host: '127.0.0.1' });
      const { port } = app.server.address() as AddressInfo;
      const socket = connect(port, '127.0.0.1');
      socket.on('error', () => undefined);
      socketClosed = new Promise((resolve) => app.server.once('connection', (s: Socket) => s.once('close', resolve)));
      socket.write(rawPost('/first', `early-${answer}-1`) + rawPost('/queued', `early-${answer}-2`));
      await new Promise((resolve) => setTimeout(resolve, 100));
      socket.destroy();
      // Before, its key answered 409 for as long as the process ran (the lease kept renewing).
      const retry = await answeredWith(app, '/queued', `early-${answer}-2`, answer === 'send' ? 201 : 410, 10_000, {});
      if (answer === 'send') expect(replayed(retry)).toBe(true);
      expect(runs).toBe(1);
    });
  }
});

describe('a handler that answers twice by mistake, behind an async app-level onSend hook', () => {
  it.each([
    ['calls send() and also returns the value', (reply: FastifyReply, n: number): unknown => (reply.code(201).send({ charged: n }), { charged: n })],
    ['calls send() twice', (reply: FastifyReply, n: number): unknown => (reply.code(201).send({ charged: n }), reply.send({ charged: n }), reply)],
  ])('%s: its first answer is stored and replayed (a rule for racing timeouts once made it 410)', async (_title, answer) => {
    let runs = 0;
    const { app } = await build((a) => {
      a.addHook('onSend', async (_request, _reply, payload) => (await new Promise((resolve) => setTimeout(resolve, 30)), payload));
      a.post('/pay', async (_request, reply) => answer(reply, ++runs));
    });
    expect((await post(app, '/pay', 'twice')).statusCode).toBe(201);
    const retry = await post(app, '/pay', 'twice');
    expect([retry.statusCode, replayed(retry), retry.json()]).toEqual([201, true, { charged: 1 }]);
    expect(runs).toBe(1);
  });
});

describe('many pipelined requests on one connection', () => {
  it('wait for its close behind one listener: no MaxListenersExceededWarning', async () => {
    const warnings: Error[] = [];
    const onWarning = (warning: Error): void => void warnings.push(warning);
    process.on('warning', onWarning);
    try {
      let open!: () => void;
      const first = new Promise<void>((resolve) => (open = resolve));
      let queued = 0;
      const { app } = await build((a) => {
        a.post('/first', async () => (await first, { first: true }));
        a.post('/orders', async (request) => (queued++, { key: request.idempotency?.key }));
      });
      await app.listen({ port: 0, host: '127.0.0.1' });
      const { port } = app.server.address() as AddressInfo;
      const socket = connect(port, '127.0.0.1');
      let received = '';
      socket.on('data', (chunk: Buffer) => void (received += chunk.toString()));
      // Fifteen keyed requests queue behind a slow first one: each waits for the socket's close.
      socket.write(rawPost('/first', 'pipelined-first') + Array.from({ length: 15 }, (_, i) => rawPost('/orders', `pipelined-${i}`)).join(''));
      await vi.waitFor(() => expect(queued).toBe(15), { timeout: 10_000 });
      open();
      await vi.waitFor(() => expect(received.match(/HTTP\/1\.1 200/g)).toHaveLength(16), { timeout: 10_000 });
      socket.destroy();
      await new Promise((resolve) => setImmediate(resolve));
      expect(warnings.filter((w) => w.name === 'MaxListenersExceededWarning')).toEqual([]);
    } finally {
      process.off('warning', onWarning);
    }
  });
});

describe('a route onSend hook after ours that fails', () => {
  it('its 500 still reaches the client (before, the error reply was dropped and the request hung)', async () => {
    const { app } = await build((a) => {
      a.post('/hook-fails', { onSend: (_request, _reply, _payload, done) => done(new Error('hook failed')) }, async () => ({ ok: 1 }));
    });
    const res = await post(app, '/hook-fails', 'hook-fails');
    expect(res.statusCode).toBe(500);
  });
});

describe('a hijacked reply whose handler throws before writing', () => {
  it('frees the key, as any throwing handler does: the retry runs again', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/hijack-throw', async (_request, reply) => {
        runs++;
        reply.hijack();
        if (runs === 1) throw new Error('before any byte');
        reply.raw.writeHead(201, { 'content-type': 'text/plain' });
        reply.raw.end('made');
      });
    });
    const overTcp = await overSocket(app);
    // Fastify only logs the error of a hijacked reply; the client waits until it gives up.
    await leaveEarly((signal) => overTcp('/hijack-throw', 'hijack-throw', signal), () => runs === 1);
    // Before, the client's leaving stored 410 cut-short (the throw went unseen).
    await answeredWith(app, '/hijack-throw', 'hijack-throw', 201, 1_000);
    expect(runs).toBe(2);
  });
});

describe('an answer sent for a handler that still runs (a timeout)', () => {
  /** A handler that waits for `finish` (and counts its runs), for the tests below to end it. */
  function held(): { runs: () => number; finish: (outcome: 'ok' | 'fail') => void; handler: () => Promise<{ charged: number }> } {
    let runs = 0;
    const waiting: Array<(outcome: 'ok' | 'fail') => void> = [];
    return {
      runs: () => runs,
      finish: (outcome) => waiting.splice(0).forEach((end) => end(outcome)),
      handler: async () => {
        const n = ++runs;
        const outcome = await new Promise<'ok' | 'fail'>((resolve) => waiting.push(resolve));
        if (outcome === 'fail') throw new Error('card declined');
        return { charged: n };
      },
    };
  }

  it("Fastify's handlerTimeout answers 503: the key stays held while the handler runs, then it is never run again", async () => {
    const op = held();
    // 1 s, not less: each of the 10 retries below must get its 409 before its own timeout fires.
    const { app } = await build((a) => a.post('/pay', { handlerTimeout: 1_000 }, op.handler));
    const first = await post(app, '/pay', 'k');
    expect(first.statusCode).toBe(503);
    expect(first.json()).toMatchObject({ code: 'FST_ERR_HANDLER_TIMEOUT' });
    // Before, the 503 freed the key at once: each of these ran the charge again beside the first.
    const retries = await Promise.all(Array.from({ length: 10 }, () => post(app, '/pay', 'k')));
    expect(retries.map((r) => r.statusCode)).toEqual(Array(10).fill(409));
    expect(op.runs()).toBe(1);
    op.finish('ok');
    // It finished, but its answer could not go out: retries are told so, and it never runs twice.
    const after = await answeredWith(app, '/pay', 'k', 410);
    expect(after.json()).toMatchObject({ code: 'ERR_IDEMKIT_RESPONSE_NOT_REPLAYABLE', reason: 'cut-short' });
    expect(op.runs()).toBe(1);
  });

  it('a handler that then fails frees the key: the retry runs it again, once it has ended', async () => {
    const op = held();
    // 1 s: the retry below runs the handler again under the same timeout, and must finish first.
    const { app, store } = await build((a) => a.post('/pay', { handlerTimeout: 1_000 }, op.handler));
    expect((await post(app, '/pay', 'k')).statusCode).toBe(503);
    expect((await post(app, '/pay', 'k')).statusCode).toBe(409);
    op.finish('fail');
    await vi.waitFor(async () => expect(await store.get(scopedKey(undefined, 'k'))).toBeUndefined(), { timeout: 10_000 });
    const retry = post(app, '/pay', 'k');
    await vi.waitFor(() => expect(op.runs()).toBe(2), { timeout: 10_000 });
    op.finish('ok');
    expect((await retry).json()).toEqual({ charged: 2 });
  });

  it('a timer in an onRequest hook answers 503 over a real socket: one charge, however many retries', async () => {
    const op = held();
    const { app } = await build((a) => {
      let requests = 0;
      a.addHook('onRequest', (_request, reply, done) => {
        // Only the first request is meant to time out: a slow machine must not turn a retry's 409 into a 503.
        const ms = requests++ === 0 ? 100 : 10_000;
        const timer = setTimeout(() => void (reply.sent || reply.code(503).header('retry-after', '1').send({ error: 'timeout' })), ms);
        reply.raw.once('close', () => clearTimeout(timer));
        done();
      });
      a.post('/pay', op.handler);
    });
    const send = await overSocket(app);
    const first = await send('/pay', 'k');
    expect(first.status).toBe(503);
    await first.text();
    const retries = await Promise.all(Array.from({ length: 10 }, () => send('/pay', 'k').then((r) => r.status)));
    expect(retries).toEqual(Array(10).fill(409));
    op.finish('ok');
    const after = await answeredWith(app, '/pay', 'k', 410);
    expect(after.json()).toMatchObject({ reason: 'cut-short' });
    expect(op.runs()).toBe(1);
  });

  it('a 503 the handler answers itself still frees the key before it goes out: the retry runs at once', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/busy', async (_request, reply) => {
        await new Promise((resolve) => setTimeout(resolve, 5));
        return reply.code(503).send({ n: ++runs });
      });
    });
    expect((await post(app, '/busy', 'k')).json()).toEqual({ n: 1 });
    expect((await post(app, '/busy', 'k')).json()).toEqual({ n: 2 });
  });

  // A first attempt at this feature took these for timeouts and marked their keys 410 for a whole
  // TTL. They are the handler's own answers: the key must be free again once the handler is done.
  it.each([
    ['answers 503 from a timer and returns reply', async (_request: unknown, reply: FastifyReply) => {
      setTimeout(() => void reply.code(503).send({ busy: true }), 5);
      return reply;
    }],
    ['sends an Error from a timer and returns reply', async (_request: unknown, reply: FastifyReply) => {
      setTimeout(() => void reply.send(Object.assign(new Error('upstream down'), { statusCode: 502 })), 5);
      return reply;
    }],
    ['sends 503 without return, then keeps working', async (_request: unknown, reply: FastifyReply) => {
      await new Promise((resolve) => setTimeout(resolve, 5));
      reply.code(503).send({ busy: true });
      await new Promise((resolve) => setTimeout(resolve, 50));
    }],
  ])('a handler that %s: its key is freed, the retry runs it again', async (_title, handler) => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/own', async (request, reply) => {
        runs++;
        return handler(request, reply);
      });
    });
    const send = await overSocket(app);
    const first = await send('/own', 'k');
    expect(first.status).toBeGreaterThanOrEqual(500);
    await first.text();
    await vi.waitFor(async () => {
      const retry = await send('/own', 'k');
      await retry.text();
      expect(retry.status).not.toBe(410);
      expect(runs).toBe(2);
    }, { timeout: 10_000 });
  });

  it('return reply.code(503).send() behind an async app-level onSend hook: freed too (as the answer finishes)', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.addHook('onSend', async (_request, _reply, payload) => {
        await new Promise((resolve) => setImmediate(resolve));
        return payload;
      });
      a.post('/own', async (_request, reply) => reply.code(503).send({ n: ++runs }));
    });
    const send = await overSocket(app);
    expect((await send('/own', 'k')).status).toBe(503);
    await vi.waitFor(async () => {
      const retry = await send('/own', 'k');
      expect(await retry.json()).toEqual({ n: 2 });
    }, { timeout: 10_000 });
  });

  it.each([
    ['returns its value', (_reply: FastifyReply, n: number): unknown => ({ charged: n })],
    ['returns reply.code(201).send(order)', (reply: FastifyReply, n: number): unknown => reply.code(201).send({ charged: n })],
  ])('the timeout and a handler that %s in the same turn: never freed for a second charge', async (_title, answer) => {
    let runs = 0;
    const { app } = await build((a) => {
      a.addHook('onRequest', (request, reply, done) => {
        // Two timers of the same delay fire in one turn, in order: first the timeout's answer,
        // then the handler's end (its payment call answered just then).
        const gate = new Promise<void>((resolve) => {
          setTimeout(() => void (reply.sent || reply.code(503).send({ error: 'timeout' })), 50);
          setTimeout(resolve, 50);
        });
        (request as unknown as { gate: Promise<void> }).gate = gate;
        done();
      });
      a.post('/pay', async (request, reply) => {
        const n = ++runs;
        await (request as unknown as { gate: Promise<void> }).gate;
        return answer(reply, n);
      });
    });
    const send = await overSocket(app);
    const first = await send('/pay', 'k');
    // The handler's late status is not the timeout's answer's.
    expect(first.status).toBe(503);
    await first.text();
    const after = await send('/pay', 'k');
    expect(after.status).toBe(410);
    expect(await after.json()).toMatchObject({ reason: 'cut-short' });
    expect(runs).toBe(1);
  });

  it.each([
    ['return reply.code(204).send()', async (reply: FastifyReply) => reply.code(204).send()],
    ['reply.redirect()', async (reply: FastifyReply) => reply.redirect('/orders/1', 303)],
    ['return reply.code(201).send(order)', async (reply: FastifyReply) => reply.code(201).send({ charged: true })],
  ])('a handler that answers with %s after a timeout answered for it: 410, never run twice', async (_title, answer) => {
    let runs = 0;
    let finish!: () => void;
    const gate = new Promise<void>((resolve) => (finish = resolve));
    const { app } = await build((a) =>
      a.post('/pay', { handlerTimeout: 100 }, async (_request, reply) => {
        runs++;
        await gate;
        return answer(reply);
      }),
    );
    expect((await post(app, '/pay', 'k')).statusCode).toBe(503);
    finish();
    // Before, an answer without a payload (204, a redirect) looked like "nothing more to say", and
    // the timeout's 503 freed the key for a second run.
    expect((await answeredWith(app, '/pay', 'k', 410)).json()).toMatchObject({ reason: 'cut-short' });
    expect(runs).toBe(1);
  });

  it.each([
    ['reply.code(500).send()', async (reply: FastifyReply) => reply.code(500).send()],
    ['reply.send(new Error())', async (reply: FastifyReply) => reply.send(new Error('card declined'))],
  ])('a handler that fails with %s after a timeout answered for it frees the key, as a throw does', async (_title, fail) => {
    let runs = 0;
    let finish!: () => void;
    const gate = new Promise<void>((resolve) => (finish = resolve));
    const { app, store } = await build((a) =>
      a.post('/pay', { handlerTimeout: 100 }, async (_request, reply) => {
        if (++runs > 1) return { charged: runs };
        await gate;
        return fail(reply);
      }),
    );
    expect((await post(app, '/pay', 'k')).statusCode).toBe(503);
    finish();
    // Before, any late send marked the key 410 for a whole TTL, a failure too.
    await vi.waitFor(async () => expect(await store.get(scopedKey(undefined, 'k'))).toBeUndefined(), { timeout: 10_000 });
    expect((await post(app, '/pay', 'k')).json()).toEqual({ charged: 2 });
  });

  it('a thenable that runs again on every then() (a query builder) is started once, even on the stand-in path', async () => {
    let started = 0;
    const { app } = await build((a) =>
      a.post('/pay', { handlerTimeout: 50 }, () => ({
        then(resolve: (value: unknown) => void) {
          started++;
          setTimeout(() => resolve({ charged: started }), 150);
        },
      })),
    );
    expect((await post(app, '/pay', 'k')).statusCode).toBe(503);
    expect((await answeredWith(app, '/pay', 'k', 410)).json()).toMatchObject({ reason: 'cut-short' });
    // Before, Fastify and the plugin each called then(): four charges for one request.
    expect(started).toBe(1);
  });

  it("a Bluebird-style promise (calls back a turn later) answering its own 503: the key is freed, not marked 410", async () => {
    let runs = 0;
    const { app } = await build((a) =>
      a.post('/busy', (_request, reply) => {
        runs++;
        reply.code(503);
        const value = { busy: runs };
        return { then: (resolve: (v: unknown) => void) => void setImmediate(() => resolve(value)) };
      }),
    );
    expect((await post(app, '/busy', 'k')).json()).toEqual({ busy: 1 });
    expect((await post(app, '/busy', 'k')).json()).toEqual({ busy: 2 });
  });

  it("leaves another plugin's own reply.send wrapper in place", async () => {
    let first: { reply: FastifyReply; theirs: FastifyReply['send'] } | undefined;
    let finish!: () => void;
    const gate = new Promise<void>((resolve) => (finish = resolve));
    const { app } = await build((a) => {
      a.addHook('onRequest', (_request, reply, done) => {
        const send = reply.send.bind(reply);
        const theirs = (payload?: unknown): FastifyReply => send(payload);
        reply.send = theirs;
        first ??= { reply, theirs };
        done();
      });
      a.post('/pay', { handlerTimeout: 50 }, async () => {
        await gate;
        return { charged: true };
      });
    });
    expect((await post(app, '/pay', 'k')).statusCode).toBe(503);
    finish();
    // The key is marked once the plugin has stopped watching the handler's sends.
    await answeredWith(app, '/pay', 'k', 410);
    // Before, stopping deleted the reply's own `send`: their wrapper was gone.
    expect(first?.reply.send).toBe(first?.theirs);
  });

  it("with concurrency: 'wait', a duplicate answered by its own timeout while it waited does not hold the key for good", async () => {
    const op = held();
    let claims = 0;
    const { app } = await build(
      (a) => {
        a.addHook('onRequest', (_request, reply, done) => {
          const timer = setTimeout(() => void (reply.sent || reply.code(503).send({ error: 'timeout' })), 100);
          reply.raw.once('close', () => clearTimeout(timer));
          done();
        });
        a.post('/pay', op.handler);
      },
      { concurrency: 'wait', onEvent: (e) => void (e.type === 'executed' && claims++) },
    );
    const send = await overSocket(app);
    expect((await send('/pay', 'k')).status).toBe(503);
    // The duplicate waits for the first, and its own timeout answers it meanwhile.
    expect((await send('/pay', 'k')).status).toBe(503);
    op.finish('fail');
    // The first failed, and the waiter took the key, though its reply had gone out: it gives it
    // back. Before, it held the key, renewed, and every retry got 409 for as long as the process ran.
    await vi.waitFor(() => expect(claims).toBe(2), { timeout: 10_000 });
    const retry = send('/pay', 'k');
    await vi.waitFor(() => expect(op.runs()).toBe(2), { timeout: 10_000 });
    op.finish('ok');
    expect(await (await retry).json()).toEqual({ charged: 2 });
  });

  // Both call reply.then in the same ticks as a handler's own `return reply.send()` does: a plugin
  // that took that for the handler's own answer freed the key while the handler still ran.
  it.each([
    ['an async error handler answering handlerTimeout with return reply.send()', true],
    ['a timer in an onRequest hook that awaits reply.send()', false],
  ] as const)('%s: the key stays held while the handler runs', async (_title, errorHandler) => {
    const op = held();
    const { app } = await build((a) => {
      if (errorHandler) {
        a.setErrorHandler(async (error: Error & { statusCode?: number }, _request, reply) => reply.code(error.statusCode ?? 500).send({ error: error.message }));
      } else {
        let requests = 0;
        a.addHook('onRequest', (_request, reply, done) => {
          // Only the first request is meant to time out (see above).
          const ms = requests++ === 0 ? 100 : 10_000;
          const timer = setTimeout(async () => {
            if (!reply.sent) await reply.code(503).send({ error: 'timeout' });
          }, ms);
          reply.raw.once('close', () => clearTimeout(timer));
          done();
        });
      }
      a.post('/pay', { handlerTimeout: errorHandler ? 100 : undefined }, op.handler);
    });
    expect((await post(app, '/pay', 'k')).statusCode).toBe(503);
    // Never a retry running the charge again beside the first (and timing out in turn).
    expect((await post(app, '/pay', 'k')).statusCode).toBe(409);
    expect(op.runs()).toBe(1);
    op.finish('ok');
    expect((await answeredWith(app, '/pay', 'k', 410)).json()).toMatchObject({ reason: 'cut-short' });
    expect(op.runs()).toBe(1);
  });

  it('a handler still at work after a timeout answered keeps its key past its lease: never a run beside it', async () => {
    const op = held();
    const { app, store } = await build((a) => a.post('/pay', { handlerTimeout: 100 }, op.handler), { leaseMs: 300 });
    const answeredAt = Date.now();
    expect((await post(app, '/pay', 'k')).statusCode).toBe(503);
    // Renewed as for any running handler: its lease now ends long after the first one would have.
    await vi.waitFor(async () => expect((await store.get(scopedKey(undefined, 'k')))?.leaseExpiresAt).toBeGreaterThan(answeredAt + 900), { timeout: 5_000, interval: 50 });
    expect((await post(app, '/pay', 'k')).statusCode).toBe(409);
    expect(op.runs()).toBe(1);
    op.finish('ok');
    expect((await answeredWith(app, '/pay', 'k', 410)).json()).toMatchObject({ reason: 'cut-short' });
    expect(op.runs()).toBe(1);
  });
});

describe('a timeout that answers while the key is being claimed, behind an async app-level onSend hook', () => {
  it.each([
    ["Fastify's handlerTimeout", { handlerTimeout: 100 }, false],
    ['a timer in an onRequest hook', {}, true],
  ] as const)("%s: the handler does not run behind its answer, which goes out as it is; the retry runs once", async (_title, routeOptions, timer) => {
    let runs = 0;
    let slow = true;
    const store = createMemoryStore();
    const begin = store.begin.bind(store);
    store.begin = async (...args: Parameters<IdempotencyStore['begin']>) => {
      // A slow store: the timeout answers while the key is being claimed.
      if (slow) await new Promise((resolve) => setTimeout(resolve, 300));
      return begin(...args);
    };
    const { app } = await build(
      (a) => {
        if (timer) {
          a.addHook('onRequest', (_request, reply, done) => {
            if (slow) setTimeout(() => void (reply.sent || reply.code(503).send({ error: 'timeout' })), 100);
            done();
          });
        }
        // Any async onSend hook keeps the timeout's answer from ending (`reply.sent`) before the key is claimed.
        a.addHook('onSend', async (_request, _reply, payload) => {
          if (slow) await new Promise((resolve) => setTimeout(resolve, 300));
          return payload;
        });
        a.post('/pay', routeOptions, async (_request, reply) => reply.code(201).send({ charged: ++runs }));
      },
      { store },
    );
    const first = await post(app, '/pay', 'k');
    // Before, the handler ran behind the timeout's answer: the client got its 201 on the
    // timeout's body, and that mix was stored and replayed.
    expect(first.statusCode).toBe(503);
    expect(first.json()).toEqual(timer ? { error: 'timeout' } : expect.objectContaining({ code: 'FST_ERR_HANDLER_TIMEOUT' }));
    expect(runs).toBe(0);
    slow = false;
    // The key just claimed was given back: the retry runs the operation, once.
    const retry = await answeredWith(app, '/pay', 'k', 201);
    expect(replayed(retry)).toBe(false);
    expect(retry.json()).toEqual({ charged: 1 });
    const again = await post(app, '/pay', 'k');
    expect(replayed(again)).toBe(true);
    expect(again.json()).toEqual({ charged: 1 });
    expect(runs).toBe(1);
  });
});

/** An app-level async onSend hook that holds each answer 300 ms while `slow()` says so. */
function slowOnSend(slow: () => boolean) {
  return async (_request: FastifyRequest, _reply: FastifyReply, payload: unknown): Promise<unknown> => {
    if (slow()) await new Promise((resolve) => setTimeout(resolve, 300));
    return payload;
  };
}

describe('a timeout that answers while the handler runs, behind an async app-level onSend hook', () => {
  /** The first request times out (100 ms) while its handler works (200 ms) and an app-level onSend hook takes 300 ms. */
  async function timedOut(answer: (reply: FastifyReply, n: number) => unknown): Promise<{ app: FastifyInstance; runs: () => number; first: LightMyRequestResponse }> {
    let runs = 0;
    let slow = true;
    const { app } = await build((a) => {
      a.addHook('onSend', slowOnSend(() => slow));
      a.post('/pay', { handlerTimeout: 100 }, async (_request, reply) => {
        const n = ++runs;
        if (slow) await new Promise((resolve) => setTimeout(resolve, 200));
        return answer(reply, n);
      });
    });
    const first = await post(app, '/pay', 'k');
    slow = false;
    return { app, runs: () => runs, first };
  }

  it("a replay, or a problem, that the timeout overtakes in the hook goes out with its own status, not the timeout's", async () => {
    let runs = 0;
    let slow = false;
    const { app } = await build((a) => {
      a.addHook('onSend', slowOnSend(() => slow));
      a.post('/pay', { handlerTimeout: 100 }, async (_request, reply) => reply.code(201).send({ charged: ++runs }));
    });
    expect((await post(app, '/pay', 'k')).statusCode).toBe(201);
    // Fastify's timer is still armed once ours answered, and fires while the hook holds the answer.
    slow = true;
    const replay = await post(app, '/pay', 'k');
    // Before, the stored body went out as a 503.
    expect(replay.statusCode).toBe(201);
    expect(replayed(replay)).toBe(true);
    expect(replay.json()).toEqual({ charged: 1 });
    const problem = await post(app, '/pay', 'k', { a: 2 });
    expect(problem.statusCode).toBe(422);
    expect(problem.json()).toMatchObject({ status: 422 });
    expect(runs).toBe(1);
  });

  it('a handler that throws after the timeout answered frees the key: the retry runs it again', async () => {
    const { app, runs } = await timedOut((_reply, n) => {
      if (n === 1) throw new Error('card declined');
      return { charged: n };
    });
    expect((await answeredWith(app, '/pay', 'k', 200)).json()).toEqual({ charged: 2 });
    expect(runs()).toBe(2);
  });
});

describe('routes added before the plugin loaded', () => {
  async function setup(wire: (app: FastifyInstance, options: FastifyIdempotencyOptions) => void) {
    const warn = vi.fn();
    const app = Fastify();
    apps.push(app);
    wire(app, { store: createMemoryStore(), logger: { warn, error: vi.fn() } });
    await app.ready();
    const named = (route: string) => warn.mock.calls.filter(([message]) => String(message).includes(`${route} has no idempotency`));
    return { app, warn, named };
  }

  it('register without await, then a route: it runs unprotected, and the log names it once', async () => {
    let runs = 0;
    const { app, named } = await setup((a, options) => {
      void a.register(fastifyIdempotency, options); // the usual Fastify idiom, but this plugin needs `await`
      a.post('/pay', async () => ({ charged: ++runs }));
    });
    for (let i = 0; i < 3; i++) await post(app, '/pay', 'k');
    expect(runs).toBe(3); // what the warning is about: every retry charged again
    expect(named('POST /pay')).toHaveLength(1);
    expect(String(named('POST /pay')[0]?.[0])).toContain('await app.register');
  });

  it('a route left out with config: { idempotency: false } is not named, whenever it was added', async () => {
    const { app, warn } = await setup((a, options) => {
      void a.register(fastifyIdempotency, options);
      a.post('/off', { config: { idempotency: false } }, async () => ({ off: true }));
    });
    await post(app, '/off', 'k');
    expect(warn).not.toHaveBeenCalled();
  });

  it('a covered route whose URL an earlier onRoute hook rewrote is not named', async () => {
    const { app, warn } = await setup((a, options) => {
      a.addHook('onRoute', (route) => {
        if (route.url === '/v0/pay') route.url = '/v1/pay';
      });
      void a.register(async (api) => {
        await api.register(fastifyIdempotency, options);
        api.post('/v0/pay', async () => ({ paid: true }));
      });
    });
    const answers = [];
    for (const url of ['/v0/pay', '/v1/pay']) for (let i = 0; i < 2; i++) answers.push(await post(app, url, `k${url}`));
    expect(answers.some((answer) => replayed(answer))).toBe(true);
    expect(warn).not.toHaveBeenCalled();
  });

  it('covered routes, routes left out with config, and GETs are never named', async () => {
    const { app, warn } = await setup((a, options) => {
      a.register(
        async (api) => {
          await api.register(fastifyIdempotency, options);
          api.post('/', async () => ({ root: 1 }));
          api.post('/a', async () => ({ a: 1 }));
          api.post('/off', { config: { idempotency: false } }, async () => ({ off: 1 }));
          api.get('/g', async () => ({ g: 1 }));
          api.register(async (child) => void child.post('/b', async () => ({ b: 1 })), { prefix: '/child' });
        },
        { prefix: '/api' },
      );
    });
    for (const url of ['/api', '/api/', '/api/a', '/api/off', '/api/child/b', '/api/missing']) await post(app, url, `k-${url}`);
    expect((await post(app, '/api/a', 'k-/api/a')).headers['idempotent-replayed']).toBe('true');
    await app.inject({ method: 'GET', url: '/api/g' });
    expect(warn).not.toHaveBeenCalled();
  });
});

describe('app-level onSend hooks that rewrite the payload', () => {
  // Fastify runs a callback-style hook that calls `done` at once inside reply.send() itself, an
  // async one a microtask later: the replay must be known as such in both.
  const prefix = (payload: unknown, reply: FastifyReply): unknown => {
    if (typeof payload !== 'string' && !Buffer.isBuffer(payload)) return payload;
    const prefixed = `)]}',\n${payload.toString()}`;
    reply.header('x-body-length', String(Buffer.byteLength(prefixed)));
    return prefixed;
  };
  it.each([
    ['async', (a: FastifyInstance) => a.addHook('onSend', async (_request, reply, payload) => prefix(payload, reply))],
    ['callback', (a: FastifyInstance) => a.addHook('onSend', (_request, reply, payload, done) => done(null, prefix(payload, reply)))],
  ])('a replay goes out as the stored answer, not rewritten a second time (%s hook)', async (_style, addHook) => {
    let runs = 0;
    const { app } = await build((a) => {
      // An XSSI prefix and a header computed from the payload, added to every answer.
      addHook(a);
      a.post('/orders', async () => ({ n: ++runs }));
    });
    const first = await post(app, '/orders', 'k');
    expect(first.body).toBe(`)]}',\n{"n":1}`);
    for (let i = 0; i < 2; i++) {
      const again = await post(app, '/orders', 'k');
      expect(replayed(again)).toBe(true);
      expect(again.body).toBe(first.body);
      expect(again.headers['x-body-length']).toBe(first.headers['x-body-length']);
      expect(again.headers['content-length']).toBe(first.headers['content-length']);
    }
    expect(runs).toBe(1);
  });
});

describe("a route's own onSend hooks (after ours)", () => {
  // A hook written for Fastify's serialised string, as a route's hooks see on the first request.
  const redact = async (_request: unknown, _reply: unknown, payload: unknown) => (payload as string).replace(/"card":"\d+"/, '"card":"****"');

  it('get a replay as the string they got the first time: the replay goes out as the first answer did', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/pay', { onSend: redact }, async (_request, reply) => reply.code(201).send({ id: ++runs, card: '4242424242424242' }));
    });
    const first = await post(app, '/pay', 'k');
    expect(first.statusCode).toBe(201);
    expect(first.body).toBe('{"id":1,"card":"****"}');
    const again = await post(app, '/pay', 'k');
    // Before: the hook got a Buffer, threw, and the retry got an error body under 201.
    expect(replayed(again)).toBe(true);
    expect(again.statusCode).toBe(201);
    expect(again.body).toBe(first.body);
    expect(again.headers['content-type']).toBe(first.headers['content-type']);
    expect(again.headers['content-length']).toBe(first.headers['content-length']);
    expect(runs).toBe(1);
  });

  it("get idemkit's own problem answers as text too: a 400 and a 422 stay problem+json", async () => {
    const { app } = await build((a) => {
      a.post('/pay', { onSend: redact }, async (_request, reply) => reply.code(201).send({ card: '4242424242424242' }));
    });
    const missing = await app.inject({ method: 'POST', url: '/pay', payload: { a: 1 } });
    expect(missing.statusCode).toBe(400);
    expect(missing.headers['content-type']).toMatch(/^application\/problem\+json/);
    expect(missing.json()).toMatchObject({ code: 'ERR_IDEMKIT_KEY_MISSING' });
    expect((await post(app, '/pay', 'k', { a: 1 })).statusCode).toBe(201);
    const other = await post(app, '/pay', 'k', { a: 2 });
    expect(other.statusCode).toBe(422);
    expect(other.json()).toMatchObject({ code: 'ERR_IDEMKIT_FINGERPRINT_MISMATCH' });
  });

  it('get an XML replay as a string too', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/xml', { onSend: async (_request, _reply, payload) => (payload as string).replace('<secret>1</secret>', '') }, async (_request, reply) =>
        reply.code(201).type('application/xml').send(`<order><id>${++runs}</id><secret>1</secret></order>`),
      );
    });
    const first = await post(app, '/xml', 'k');
    const again = await post(app, '/xml', 'k');
    expect(first.body).toBe('<order><id>1</id></order>');
    expect(replayed(again)).toBe(true);
    expect(again.statusCode).toBe(201);
    expect(again.body).toBe(first.body);
  });

  it('get a binary replay as a Buffer, byte for byte', async () => {
    const bytes = Buffer.from([0xff, 0x00, 0xc3, 0x28, 0x7b]);
    const seen: string[] = [];
    const { app } = await build((a) => {
      a.post('/bin', { onSend: async (_request, _reply, payload) => (seen.push(Buffer.isBuffer(payload) ? 'buffer' : typeof payload), payload) }, async (_request, reply) =>
        reply.code(201).type('application/octet-stream').send(bytes),
      );
    });
    const first = await post(app, '/bin', 'k');
    const again = await post(app, '/bin', 'k');
    expect(replayed(again)).toBe(true);
    expect(again.rawPayload.equals(bytes)).toBe(true);
    expect(first.rawPayload.equals(bytes)).toBe(true);
    expect(seen).toEqual(['buffer', 'buffer']);
  });
});

describe('errors and validation', () => {
  it("a body that fails Fastify's schema validation never takes a lease: the key stays free", async () => {
    let runs = 0;
    const { app, store } = await build((a) => {
      a.post(
        '/validated',
        { schema: { body: { type: 'object', required: ['sku'], properties: { sku: { type: 'string' } } } } },
        async (request) => ({ n: ++runs, body: request.body }),
      );
    });
    const invalid = await post(app, '/validated', 'k', { nope: true });
    expect(invalid.statusCode).toBe(400);
    expect(invalid.json()).toMatchObject({ code: 'FST_ERR_VALIDATION' });
    expect(await store.get(scopedKey(undefined, 'k'))).toBeUndefined();
    // The corrected request with the same key runs (no 422: nothing was recorded for the bad one).
    const valid = await post(app, '/validated', 'k', { sku: 'A-1' });
    expect(valid.statusCode).toBe(200);
    expect(valid.json()).toEqual({ n: 1, body: { sku: 'A-1' } });
  });

  it('with attachValidation, an invalid body takes no lease either: the corrected request with the same key runs', async () => {
    let runs = 0;
    const { app, store } = await build((a) => {
      a.post(
        '/validated',
        { attachValidation: true, schema: { body: { type: 'object', required: ['sku'], properties: { sku: { type: 'string' } } } } },
        async (request, reply) => {
          if (request.validationError) return reply.code(400).send({ error: request.validationError.message });
          return reply.code(201).send({ n: ++runs });
        },
      );
    });
    const invalid = await post(app, '/validated', 'k', { nope: true });
    expect(invalid.statusCode).toBe(400);
    expect(await store.get(scopedKey(undefined, 'k'))).toBeUndefined();
    // Before, the 400 was stored, and the corrected request got 422 for a whole TTL.
    const valid = await post(app, '/validated', 'k', { sku: 'A-1' });
    expect(valid.statusCode).toBe(201);
    expect(replayed(await post(app, '/validated', 'k', { sku: 'A-1' }))).toBe(true);
    expect(runs).toBe(1);
  });

  it('a handler that throws a 4xx: Fastify renders it, nothing is stored, the retry runs again', async () => {
    let runs = 0;
    const { app, store } = await build((a) => {
      a.post('/fail', async () => {
        runs++;
        throw Object.assign(new Error('out of stock'), { statusCode: 400 });
      });
    });
    const first = await post(app, '/fail', 'k');
    expect(first.statusCode).toBe(400);
    expect(first.json()).toMatchObject({ message: 'out of stock' });
    expect(await store.get(scopedKey(undefined, 'k'))).toBeUndefined();
    const retry = await post(app, '/fail', 'k');
    expect(retry.statusCode).toBe(400);
    expect(replayed(retry)).toBe(false);
    expect(runs).toBe(2);
  });

  it('a custom error handler that answers 200 still does not store the failed run', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.setErrorHandler(async (_error, _request, reply) => reply.code(200).send({ recovered: true }));
      a.post('/recover', async () => {
        runs++;
        throw new Error('boom');
      });
    });
    expect((await post(app, '/recover', 'k')).json()).toEqual({ recovered: true });
    expect(replayed(await post(app, '/recover', 'k'))).toBe(false);
    expect(runs).toBe(2);
  });

  it('a 500 from the handler is never stored', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/five', async (_request, reply) => reply.code(500).send({ n: ++runs }));
    });
    await post(app, '/five', 'k');
    const again = await post(app, '/five', 'k');
    expect(again.json()).toEqual({ n: 2 });
  });

  it('problems are core problem+json bytes; onProblem replaces them', async () => {
    const plain = await build((a) => {
      a.post('/p', async () => ({}));
    });
    const res = await post(plain.app, '/p');
    expect(res.statusCode).toBe(400);
    expect(res.headers['content-type']).toBe('application/problem+json');
    expect(res.json()).toMatchObject({ type: 'https://idemkit.dev/problems/key-missing', code: 'ERR_IDEMKIT_KEY_MISSING' });

    const custom = await build(
      (a) => {
        a.post('/p', async () => ({}));
      },
      {
        onProblem: async (_request, reply, error) => {
          await reply.code(error.status).header('x-problem', error.code).send({ oops: true });
        },
      },
    );
    const replaced = await post(custom.app, '/p');
    expect(replaced.statusCode).toBe(400);
    expect(replaced.headers['x-problem']).toBe('ERR_IDEMKIT_KEY_MISSING');
    expect(replaced.json()).toEqual({ oops: true });
  });

  it('an onProblem that returns without answering (a logger, say): core problem goes out instead of the request hanging', async () => {
    const seen: string[] = [];
    const { app } = await build(
      (a) => {
        a.post('/p', async () => ({}));
      },
      { onProblem: async (_request, _reply, error) => void seen.push(error.code) },
    );
    const res = await post(app, '/p');
    expect(res.statusCode).toBe(400);
    expect(res.headers['content-type']).toBe('application/problem+json');
    expect(res.json()).toMatchObject({ code: 'ERR_IDEMKIT_KEY_MISSING' });
    expect(seen).toEqual(['ERR_IDEMKIT_KEY_MISSING']);
  });

  it('an onProblem that sends without returning the reply, behind an async app-level onSend hook: its answer goes out, not core\'s as well', async () => {
    const { app } = await build(
      (a) => {
        a.addHook('onSend', async (_request, _reply, payload) => {
          await new Promise((resolve) => setImmediate(resolve)); // the bytes go out a turn later
          return payload;
        });
        a.post('/p', async () => ({}));
      },
      {
        onProblem: (_request, reply, error) => {
          void reply.code(418).header('x-mine', error.code).send({ mine: true });
        },
      },
    );
    const res = await post(app, '/p');
    expect(res.statusCode).toBe(418);
    expect(res.headers['x-mine']).toBe('ERR_IDEMKIT_KEY_MISSING');
    expect(res.json()).toEqual({ mine: true });
  });

  it('onProblem is not called for the stored 410 of a streamed answer: its retries replay it as stored', async () => {
    const problems: number[] = [];
    const { app } = await build(
      (a) => {
        a.post('/s', async (_request, reply) => reply.send(Readable.from(['part 1, ', 'part 2'])));
      },
      {
        onProblem: async (_request, reply, error) => {
          problems.push(error.status);
          await reply.code(error.status).send({ oops: true });
        },
      },
    );
    expect((await post(app, '/s', 'streamed')).statusCode).toBe(200);
    const retry = await post(app, '/s', 'streamed');
    expect(retry.statusCode).toBe(410);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(retry.json()).toMatchObject({ reason: 'not-bufferable', originalStatus: 200 });
    expect(problems).toEqual([]);
  });
});

describe('several stores', () => {
  it('sibling encapsulated contexts can each register the plugin with their own store', async () => {
    const storeA = createMemoryStore();
    const storeB = createMemoryStore();
    const app = Fastify();
    apps.push(app);
    void app.register(async (a) => {
      await a.register(fastifyIdempotency, { store: storeA, logger: false });
      a.post('/a', async () => ({ at: 'a' }));
    });
    void app.register(async (b) => {
      await b.register(fastifyIdempotency, { store: storeB, logger: false });
      b.post('/b', async () => ({ at: 'b' }));
    });
    await app.ready();
    await post(app, '/a', 'same');
    await post(app, '/b', 'same');
    expect((await storeA.get(scopedKey(undefined, 'same')))?.response).toBeTruthy();
    expect((await storeB.get(scopedKey(undefined, 'same')))?.response).toBeTruthy();
    expect(replayed(await post(app, '/b', 'same'))).toBe(true);
  });

  it('registering it again inside a context that already has it fails loudly', async () => {
    const app = Fastify();
    apps.push(app);
    await app.register(fastifyIdempotency, { store: createMemoryStore(), logger: false });
    void app.register(async (child) => {
      await child.register(fastifyIdempotency, { store: createMemoryStore(), logger: false });
    });
    await expect(app.ready()).rejects.toThrow(/idempotency/);
  });
});

describe('a status or header set after send()', () => {
  // Plain Fastify writes the answer inside send() (no async onSend hook), so later reply.code() or
  // reply.header() calls change nothing. The plugin's onSend waits for the store, and such calls
  // used to reach the client: a 201 that was stored went out as a 500, and the replay differed.
  it('changes neither the answer that goes out nor its replay: both are what was stored', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/sync', (_request, reply) => {
        runs++;
        reply.code(201).header('set-cookie', 'a=1').send({ id: runs });
        reply.code(500).header('x-late', '1').header('set-cookie', 'late=1');
      });
    });
    const overTcp = await overSocket(app);
    const first = await overTcp('/sync', 'late-sync');
    expect(first.status).toBe(201);
    expect(first.headers.get('x-late')).toBeNull();
    expect(first.headers.getSetCookie()).toEqual(['a=1']);
    expect(await first.text()).toBe('{"id":1}');
    const retry = await overTcp('/sync', 'late-sync');
    expect(retry.status).toBe(201);
    expect(retry.headers.get('idempotent-replayed')).toBe('true');
    expect(retry.headers.get('x-late')).toBeNull();
    expect(retry.headers.getSetCookie()).toEqual(['a=1']);
    expect(await retry.text()).toBe('{"id":1}');
    expect(runs).toBe(1);
  });
});

describe('an answer without a content-type', () => {
  // reply.serializer() without reply.type(): Fastify sends the serialised body with no
  // content-type. The replay's Buffer used to gain Fastify's `application/octet-stream`.
  it('replays without one too, as it went out', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.post('/custom', async (_request, reply) => {
        runs++;
        return reply.code(201).serializer((value: unknown) => `custom:${JSON.stringify(value)}`).send({ id: runs });
      });
    });
    const overTcp = await overSocket(app);
    const first = await overTcp('/custom', 'untyped');
    expect(first.headers.get('content-type')).toBeNull();
    expect(await first.text()).toBe('custom:{"id":1}');
    const retry = await overTcp('/custom', 'untyped');
    expect(retry.status).toBe(201);
    expect(retry.headers.get('idempotent-replayed')).toBe('true');
    expect(retry.headers.get('content-type')).toBeNull();
    expect(await retry.text()).toBe('custom:{"id":1}');
    expect(runs).toBe(1);
  });
});

describe('a content-type a hook sets before the key is claimed', () => {
  it('is the replay\'s own, as on the first answer', async () => {
    const { app } = await build((a) => {
      a.addHook('onRequest', (_request, reply, done) => {
        reply.type('application/json; charset=utf-8');
        done();
      });
      a.post('/typed', async () => ({ ok: true }));
    });
    const first = await post(app, '/typed', 'typed-by-hook');
    const retry = await post(app, '/typed', 'typed-by-hook');
    expect(replayed(retry)).toBe(true);
    expect(retry.headers['content-type']).toBe(first.headers['content-type']);
    expect(retry.body).toBe(first.body);
  });
});

describe("a route's own onSend hook, with a content-type a hook set before the key was claimed", () => {
  // That type is not stored (the hook sets it again for the retry), so the replay's body used to
  // reach the route's hook as a Buffer: its payload.replace() threw, and the retry got an error.
  it('gets the replay as the string it got the first time', async () => {
    let runs = 0;
    const { app } = await build((a) => {
      a.addHook('onRequest', (_request, reply, done) => {
        reply.type('application/vnd.api+json; charset=utf-8');
        done();
      });
      a.post('/shout', { onSend: (_request, _reply, payload, done) => done(null, (payload as string).toUpperCase()) }, async () => ({ id: ++runs }));
    });
    const first = await post(app, '/shout', 'typed-before-claim');
    expect(first.body).toBe('{"ID":1}');
    const retry = await post(app, '/shout', 'typed-before-claim');
    expect(retry.statusCode).toBe(200);
    expect(replayed(retry)).toBe(true);
    expect(retry.headers['content-type']).toBe('application/vnd.api+json; charset=utf-8');
    expect(retry.body).toBe('{"ID":1}');
    expect(runs).toBe(1);
  });
});
