import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import http2 from 'node:http2';
import { connect, type AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { createGzip } from 'node:zlib';
import { bodyParser } from '@koa/bodyparser';
import Router from '@koa/router';
import { createMemoryStore, MemoryStore, defaultFingerprint, problemResponse, KeyError, scopedKey, TransactionAbortedError, type IdempotencyEvent, type IdempotencyStore, type StoreTransaction, type TransactionalStore } from '@idemkit/core';
import Koa, { type Context, type Middleware } from 'koa';
import { koaBody } from 'koa-body';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ConfigurationError, idempotency, type IdempotencyState } from '../src/index.js';
import { SlowBeginStore } from '@idemkit/http-suite';
import { rawBody } from './app.js';
import { leaveWhileRunning, pipelinedBehindSlow, post, postUntil, startKoa } from './helpers.js';
import { twinSuite } from './twin-cases.js';

const closers: Array<() => Promise<void>> = [];
afterEach(async () => {
  await Promise.all(closers.splice(0).map((close) => close()));
});

async function start(...args: Parameters<typeof startKoa>): ReturnType<typeof startKoa> {
  const handle = await startKoa(...args);
  closers.push(handle.close);
  return handle;
}

twinSuite('koa 3', Koa);


/** A POST answered over HTTP/1.1 or HTTP/2: its status and body. */
interface Answer {
  status: number;
  text: string;
}

/**
 * Serve `app` over `protocol` and send POST /orders with a key. With `leaveOnce`, the request is
 * cancelled (an HTTP/2 stream reset, or an aborted fetch) once that says the server has it, and
 * `send` resolves at once.
 */
async function serveOver(app: Koa, protocol: string): Promise<{ send(key: string, leaveOnce?: () => boolean): Promise<Answer>; close(): void }> {
  const server = protocol === 'HTTP/2' ? http2.createServer(app.callback()) : createServer(app.callback());
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const origin = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const client = protocol === 'HTTP/2' ? http2.connect(origin) : undefined;
  const send = async (key: string, leaveOnce?: () => boolean): Promise<Answer> => {
    if (client) {
      const req = client.request({ ':method': 'POST', ':path': '/orders', 'idempotency-key': key }, { endStream: true });
      req.on('error', () => undefined);
      if (leaveOnce) {
        await vi.waitFor(() => expect(leaveOnce()).toBe(true), { timeout: 10_000 });
        req.close(http2.constants.NGHTTP2_CANCEL);
        return { status: 0, text: '' };
      }
      const [headers] = (await once(req, 'response')) as [http2.IncomingHttpHeaders];
      let text = '';
      req.setEncoding('utf8');
      for await (const chunk of req) text += chunk as string;
      return { status: Number(headers[':status']), text };
    }
    const abort = new AbortController();
    const reply = fetch(`${origin}/orders`, { method: 'POST', headers: { 'idempotency-key': key }, signal: abort.signal });
    if (leaveOnce) {
      reply.catch(() => undefined);
      await vi.waitFor(() => expect(leaveOnce()).toBe(true), { timeout: 10_000 });
      abort.abort();
      return { status: 0, text: '' };
    }
    const res = await reply;
    return { status: res.status, text: await res.text() };
  };
  return {
    send,
    close: () => {
      client?.close();
      server.close();
    },
  };
}

describe('koa binding: headers set by middleware before idempotency()', () => {
  it('a Content-Type set before it and left by the handler is on the replay too (it used to be removed)', async () => {
    let runs = 0;
    const { url } = await start((app) => {
      app.use(async (ctx, next) => {
        ctx.type = 'json';
        ctx.set('Cache-Control', 'no-store');
        await next();
      });
      app.use(idempotency({ store: createMemoryStore() }));
      app.use((ctx) => {
        runs++;
        ctx.status = 201;
        ctx.body = ctx.path === '/text' ? JSON.stringify({ id: runs }) : { id: runs };
      });
    });
    for (const path of ['/object', '/text']) {
      const key = `type-${path}`;
      const first = await post(url + path, key);
      const replay = await post(url + path, key);
      expect(replay.headers.get('idempotent-replayed')).toBe('true');
      for (const name of ['content-type', 'cache-control']) expect([name, replay.headers.get(name)]).toEqual([name, first.headers.get(name)]);
      expect(await replay.text()).toBe(await first.text());
    }
    expect(runs).toBe(2);
  });
});

describe('koa binding: what is not replayed', () => {
  it('a stream body goes out unchanged; retries get 410 and never re-run it', async () => {
    let runs = 0;
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore() }));
      app.use((ctx) => {
        runs++;
        ctx.type = 'text/plain';
        ctx.body = Readable.from(['a', 'b', 'c']);
      });
    });
    const first = await post(url, 'stream');
    expect(first.status).toBe(200);
    expect(first.headers.get('content-type')).toBe('text/plain; charset=utf-8');
    expect(await first.text()).toBe('abc');
    const retry = await post(url, 'stream');
    expect(retry.status).toBe(410);
    expect(await retry.json()).toMatchObject({ code: 'ERR_IDEMKIT_RESPONSE_NOT_REPLAYABLE', originalStatus: 200, reason: 'not-bufferable' });
    expect(runs).toBe(1);
  });

  it.each([
    ['Blob', (ctx: Koa.Context) => { ctx.body = new Blob(['blob']); }, 'blob'],
    ['ReadableStream', (ctx: Koa.Context) => { ctx.body = new Blob(['web']).stream(); }, 'web'],
    ['Response', (ctx: Koa.Context) => { ctx.body = new Response('resp'); }, 'resp'],
  ] as const)('a %s body is passed through and marked not replayable', async (_name, handler, text) => {
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore() }));
      app.use(handler);
    });
    const first = await post(url, 'k');
    expect(await first.text()).toBe(text);
    expect((await post(url, 'k')).status).toBe(410);
  });

  it('ctx.respond = false: the handler writes itself; retries get 410', async () => {
    let runs = 0;
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore() }));
      app.use((ctx) => {
        runs++;
        ctx.respond = false;
        ctx.res.statusCode = 201;
        ctx.res.end('raw');
      });
    });
    const first = await post(url, 'raw');
    expect(first.status).toBe(201);
    expect(await first.text()).toBe('raw');
    const retry = await post(url, 'raw');
    expect(retry.status).toBe(410);
    expect(runs).toBe(1);
  });

  /** An app whose handler answers through ctx.res itself (`ctx.respond = false`), via `answer`. */
  async function rawAnswerApp(answer: (ctx: Context) => void) {
    let runs = 0;
    const store = createMemoryStore();
    const { url } = await start((app) => {
      app.use(idempotency({ store }));
      app.use((ctx) => {
        runs++;
        ctx.respond = false;
        answer(ctx);
      });
    });
    return { url, store, runs: () => runs };
  }

  it.each([
    [201, 410, 1],
    [500, 500, 2], // not storable: the key is released and the retry runs again
  ] as const)('ctx.respond = false, answered %i after the handler returned (a proxy): the retry gets %i', async (status, retryStatus, runsAfter) => {
    // Written later, as a proxy does: when the middleware chain resolves, nothing went out yet.
    const { url, store, runs } = await rawAnswerApp((ctx) =>
      setImmediate(() => {
        ctx.res.statusCode = status;
        ctx.res.end('later');
      }),
    );
    const first = await post(url, `late-${status}`);
    expect(first.status).toBe(status);
    expect(await first.text()).toBe('later');
    await vi.waitFor(async () => expect((await store.get(scopedKey(undefined, `late-${status}`)))?.state).not.toBe('in_progress'), { timeout: 10_000 });
    const retry = await post(url, `late-${status}`);
    expect(retry.status).toBe(retryStatus);
    if (retryStatus === 410) expect(await retry.json()).toMatchObject({ originalStatus: 201, reason: 'not-bufferable' });
    expect(runs()).toBe(runsAfter);
  });

  it('ctx.respond = false, the client leaves before the late answer: the key is not freed for a second run', async () => {
    let answer!: () => void;
    // A proxy still waiting on its upstream when the client gives up.
    const { url, store, runs } = await rawAnswerApp((ctx) => {
      answer = () => {
        ctx.res.statusCode = 201;
        ctx.res.end('late');
      };
    });
    const controller = new AbortController();
    const first = post(url, 'gone-early', { a: 1 }, {}, controller.signal).catch((error: unknown) => error);
    await vi.waitFor(() => expect(runs()).toBe(1), { timeout: 10_000 });
    controller.abort();
    await first;
    await vi.waitFor(async () => expect((await store.get(scopedKey(undefined, 'gone-early')))?.state).toBe('completed'), { timeout: 10_000 });
    const retry = await post(url, 'gone-early');
    expect(retry.status).toBe(410);
    // No status went out, so none is recorded (not Koa's placeholder 404), whatever storable says.
    expect(await retry.json()).toMatchObject({ reason: 'cut-short', originalStatus: null });
    answer(); // the upstream answers after all, into a closed response
    expect(runs()).toBe(1);
  });

  it('ctx.respond = false, a whole answer sent, then a throw: the operation answered, so it is never run again', async () => {
    let runs = 0;
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore() }));
      app.use(async (ctx) => {
        runs++;
        ctx.respond = false;
        ctx.res.writeHead(202, { 'content-type': 'application/json' });
        ctx.res.end('{"ok":true}');
        throw new Error('after the answer');
      });
    });
    const first = await post(url, 'sent-then-threw');
    expect(first.status).toBe(202);
    expect(await first.json()).toEqual({ ok: true });
    const retry = await post(url, 'sent-then-threw');
    expect(retry.status).toBe(410);
    expect(await retry.json()).toMatchObject({ originalStatus: 202 });
    expect(runs).toBe(1);
  });

  // Was: nothing in the log said why every compressed answer's retry got 410 (Express says it).
  it('compression mounted after idempotency() (as koa-compress does it) makes answers 410: said once in the log; mounted before it, replayed and silent', async () => {
    /** What koa-compress does after its next(): the body piped through gzip, Content-Encoding set. */
    const gzip: Middleware = async (ctx, next) => {
      await next();
      const stream = createGzip();
      const body: unknown = ctx.body;
      stream.end(Buffer.isBuffer(body) || typeof body === 'string' ? body : JSON.stringify(body));
      ctx.body = stream;
      ctx.set('Content-Encoding', 'gzip');
      ctx.remove('Content-Length');
    };
    const handler: Middleware = (ctx) => {
      ctx.status = 201;
      ctx.body = { id: 'order_1' };
    };
    const after = vi.fn();
    const inner = await start((app) => {
      app.use(idempotency({ store: createMemoryStore(), logger: { warn: after, error: vi.fn() } }));
      // A plain download first: a stream with no Content-Encoding is no compression mistake. Was,
      // on Koa 3: "Content-Encoding: undefined" warned, and the gzip case below was never said.
      app.use(async (ctx, next) => {
        if (ctx.path !== '/download') return next();
        ctx.status = 201;
        ctx.body = Readable.from(['a,b\n', '1,2\n']);
      });
      app.use(gzip);
      app.use(handler);
    });
    const download = await post(`${inner.url}/download`, 'csv');
    expect(download.status).toBe(201);
    expect(await download.text()).toBe('a,b\n1,2\n');
    expect(after).not.toHaveBeenCalled();
    for (const key of ['gz-1', 'gz-2']) {
      const first = await post(inner.url, key);
      expect(first.status).toBe(201);
      expect(await first.json()).toEqual({ id: 'order_1' });
      expect((await post(inner.url, key)).status).toBe(410);
    }
    expect(after).toHaveBeenCalledTimes(1);
    expect(after.mock.calls[0]?.[0]).toMatch(/Content-Encoding: gzip.*mount it before idempotency\(\)/);

    const before = vi.fn();
    const outer = await start((app) => {
      app.use(gzip);
      app.use(idempotency({ store: createMemoryStore(), logger: { warn: before, error: vi.fn() } }));
      app.use(handler);
    });
    expect((await post(outer.url, 'gz')).status).toBe(201);
    const replay = await post(outer.url, 'gz');
    expect(replay.status).toBe(201);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(await replay.json()).toEqual({ id: 'order_1' });
    expect(before).not.toHaveBeenCalled();
  });

  it('a body over maxBodyBytes goes out whole; retries get 410 with reason too-large', async () => {
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore(), maxBodyBytes: 10 }));
      app.use((ctx) => { ctx.body = { text: 'more than ten bytes' }; });
    });
    const first = await post(url, 'big');
    expect(await first.json()).toEqual({ text: 'more than ten bytes' });
    const retry = await post(url, 'big');
    expect(retry.status).toBe(410);
    expect(await retry.json()).toMatchObject({ reason: 'too-large' });
  });
});

describe('koa binding: transactional mode, rolled back', () => {
  /** A transaction whose completion fails (as a COMMIT can): nothing committed, the key is freed. */
  function failingCommitStore(failure: () => Error = () => new Error('COMMIT failed')): TransactionalStore<null> {
    return Object.assign(createMemoryStore(), {
      async beginTransaction(): Promise<StoreTransaction<null>> {
        return { client: null, complete: () => Promise.reject(failure()), rollback: async () => undefined };
      },
    });
  }

  it('a stream answer is replaced by the 503 too, not sent as if its writes had committed; the retry runs again', async () => {
    let runs = 0;
    const { url } = await start((app) => {
      app.use(idempotency({ store: failingCommitStore(), transactional: true, logger: false }));
      app.use((ctx) => {
        runs++;
        ctx.status = 201;
        ctx.type = 'text/csv';
        ctx.body = Readable.from(['order,status\n', '1,placed\n']);
      });
    });
    const first = await post(url, 'csv');
    expect(first.status).toBe(503);
    expect(first.headers.get('content-type')).toBe('application/problem+json');
    expect(await first.text()).toContain('rolled back');
    expect((await post(url, 'csv')).status).toBe(503);
    expect(runs).toBe(2);
  });

  it('a 4xx stream from a handler whose own failed statement aborted the transaction goes out as it is', async () => {
    const { url } = await start((app) => {
      app.use(idempotency({ store: failingCommitStore(() => new TransactionAbortedError()), transactional: true, logger: false }));
      app.use((ctx) => {
        ctx.status = 422;
        ctx.type = 'text/plain';
        ctx.body = Readable.from(['email ', 'taken']);
      });
    });
    const first = await post(url, 'taken');
    expect(first.status).toBe(422);
    expect(await first.text()).toBe('email taken');
  });

  it('an answer whose head the handler already wrote is cut instead of completed as a 201', async () => {
    const { url } = await start((app) => {
      app.use(idempotency({ store: failingCommitStore(), transactional: true, logger: false }));
      app.use((ctx) => {
        ctx.res.writeHead(201, { 'content-type': 'text/plain' });
        ctx.body = 'created';
      });
    });
    await expect(post(url, 'head-out').then((res) => res.text())).rejects.toThrow();
  });
});

describe('koa binding: thrown errors release the key', () => {
  it.each([
    ['ctx.throw(404)', (ctx: Koa.Context) => ctx.throw(404, 'no such order'), 404, 'no such order'],
    ['ctx.throw(400)', (ctx: Koa.Context) => ctx.throw(400), 400, 'Bad Request'],
    ['new Error()', () => { throw new Error('boom'); }, 500, 'Internal Server Error'],
  ] as const)('%s: Koa renders it unchanged and a retry runs again', async (_name, handler, status, text) => {
    let runs = 0;
    const events: IdempotencyEvent[] = [];
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore(), onEvent: (e) => events.push(e) }));
      app.use((ctx) => {
        runs++;
        handler(ctx);
      });
    });
    for (let i = 0; i < 2; i++) {
      const res = await post(url, 'thrown');
      expect(res.status).toBe(status);
      expect(await res.text()).toBe(text);
      expect(res.headers.get('idempotent-replayed')).toBeNull();
    }
    expect(runs).toBe(2);
    expect(events.filter((e) => e.type === 'released')).toEqual([
      { type: 'released', key: 'thrown', reason: 'handler-threw' },
      { type: 'released', key: 'thrown', reason: 'handler-threw' },
    ]);
  });

  it.each([
    ['a BigInt (JSON.stringify throws)', { n: 1n }],
    ['a function (JSON.stringify gives undefined)', () => 'forgot to call it'],
    ['a toJSON() that returns undefined', { toJSON: () => undefined }],
  ] as const)('a body Koa cannot serialise, %s: Koa answers 500 as without idempotency(), and a retry runs again (it was marked 410)', async (_name, body) => {
    let runs = 0;
    const events: IdempotencyEvent[] = [];
    const handler: Middleware = (ctx) => {
      runs++;
      ctx.status = 201;
      ctx.body = body;
    };
    const plain = await start((app) => app.use(handler));
    const guarded = await start((app) => {
      app.use(idempotency({ store: createMemoryStore(), onEvent: (e) => events.push(e) }));
      app.use(handler);
    });
    const expected = await post(plain.url, undefined);
    expect(expected.status).toBe(500);
    const text = await expected.text();
    runs = 0;
    for (let i = 0; i < 2; i++) {
      const res = await post(guarded.url, 'unserialisable');
      expect(res.status).toBe(500);
      expect(await res.text()).toBe(text);
    }
    expect(runs).toBe(2);
    expect(events.filter((e) => e.type === 'released').map((e) => e.type === 'released' && e.reason)).toEqual(['handler-threw', 'handler-threw']);
  });

  it('a covered HEAD with a body JSON.stringify makes nothing of and a Content-Length set: Koa answers it (no 500), so a retry does not run the handler again', async () => {
    let runs = 0;
    const handler: Middleware = (ctx) => {
      runs++;
      ctx.status = 201;
      ctx.body = () => 'forgot to call it';
      ctx.set('Content-Length', '2');
    };
    const plain = await start((app) => app.use(handler));
    const guarded = await start((app) => {
      app.use(idempotency({ store: createMemoryStore(), methods: ['POST', 'HEAD'] }));
      app.use(handler);
    });
    const head = (url: string): Promise<Response> => fetch(url, { method: 'HEAD', headers: { 'idempotency-key': 'head-fn' } });
    expect((await head(plain.url)).status).toBe(201);
    runs = 0;
    expect((await head(guarded.url)).status).toBe(201);
    // Before: the key was freed as if Koa had failed it, and this retry ran the handler again.
    const retry = await head(guarded.url);
    expect(retry.status).toBe(410);
    expect(runs).toBe(1);
  });

  it.each([
    ['a BigInt', { n: 1n }],
    ['a toJSON() that throws', { toJSON: (): never => { throw new Error('not serialisable'); } }],
  ] as const)('a covered HEAD with a body JSON.stringify throws on, %s, and a Content-Length set: Koa answers it (no 500), so a retry does not run the handler again', async (_name, body) => {
    let runs = 0;
    const handler: Middleware = (ctx) => {
      runs++;
      ctx.status = 201;
      ctx.body = body;
      ctx.set('Content-Length', '2');
    };
    const plain = await start((app) => app.use(handler));
    const guarded = await start((app) => {
      app.use(idempotency({ store: createMemoryStore(), methods: ['POST', 'HEAD'] }));
      app.use(handler);
    });
    const head = (url: string): Promise<Response> => fetch(url, { method: 'HEAD', headers: { 'idempotency-key': 'head-throws' } });
    expect((await head(plain.url)).status).toBe(201);
    runs = 0;
    // Before: JSON.stringify threw in the middleware, so a 500 for an answer Koa sends, the key
    // freed, and the retry ran the handler again.
    expect((await head(guarded.url)).status).toBe(201);
    expect((await head(guarded.url)).status).toBe(410);
    expect(runs).toBe(1);
  });

  it('documented: middleware before idempotency() that throws after its await next() fails an answer already stored; the retry gets it, the handler runs once', async () => {
    let runs = 0;
    let audits = 0;
    const { url } = await start((app) => {
      app.use(async (_ctx, next) => {
        await next();
        audits++;
        if (audits === 1) throw new Error('audit log down');
      });
      app.use(idempotency({ store: createMemoryStore() }));
      app.use((ctx) => {
        runs++;
        ctx.status = 201;
        ctx.body = { id: runs };
      });
    });
    const first = await post(url, 'after-next');
    expect(first.status).toBe(500);
    const retry = await post(url, 'after-next');
    expect(retry.status).toBe(201);
    expect(retry.headers.get('idempotent-replayed')).toBe('true');
    expect(await retry.json()).toEqual({ id: 1 });
    expect(runs).toBe(1);
  });

  it('an error middleware mounted inside turns the throw into a 500 response: not stored either', async () => {
    let runs = 0;
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore() }));
      app.use(async (ctx, next) => {
        try {
          await next();
        } catch {
          ctx.status = 500;
          ctx.body = { error: 'caught' };
        }
      });
      app.use(() => {
        runs++;
        throw new Error('boom');
      });
    });
    expect((await post(url, 'inner')).status).toBe(500);
    expect((await post(url, 'inner')).status).toBe(500);
    expect(runs).toBe(2);
  });
});

describe('koa binding: problems', () => {
  it('writes core problemResponse bytes exactly', async () => {
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore() }));
      app.use((ctx) => { ctx.body = 'never'; });
    });
    const res = await post(url, undefined);
    const expected = problemResponse(new KeyError('ERR_IDEMKIT_KEY_MISSING', 400, 'This request needs an Idempotency-Key header (or an `idempotencyKey` field in its JSON body).'));
    expect(res.status).toBe(400);
    expect(res.headers.get('content-type')).toBe('application/problem+json');
    expect(res.headers.get('content-length')).toBe(String(expected.body.byteLength));
    expect(Buffer.from(await res.arrayBuffer()).equals(Buffer.from(expected.body))).toBe(true);
  });

  it('onProblem overrides the answer', async () => {
    const { url } = await start((app) => {
      app.use(
        idempotency({
          store: createMemoryStore(),
          onProblem: (ctx, error) => {
            ctx.status = error.status;
            ctx.body = { message: error.message, code: error.code };
          },
        }),
      );
      app.use((ctx) => { ctx.body = 'never'; });
    });
    const res = await post(url, undefined);
    expect(res.status).toBe(400);
    expect(res.headers.get('content-type')).toBe('application/json; charset=utf-8');
    expect(await res.json()).toEqual({ message: 'This request needs an Idempotency-Key header (or an `idempotencyKey` field in its JSON body).', code: 'ERR_IDEMKIT_KEY_MISSING' });
  });

  // Was: Koa's own 404 Not Found went out for every problem (400/409/422/503).
  it.each([
    ['logs only', (seen: string[]) => (_ctx: Context, error: { code: string }) => void seen.push(error.code)],
    ['logs only, async', (seen: string[]) => async (_ctx: Context, error: { code: string }) => void seen.push(error.code)],
    ['sets a header only', (seen: string[]) => (ctx: Context, error: { code: string }) => void (seen.push(error.code), ctx.set('X-Problem', error.code))],
  ] as const)('an onProblem that %s and answers nothing: the problem goes out as it would without one', async (_name, onProblemOf) => {
    const seen: string[] = [];
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore(), onProblem: onProblemOf(seen) }));
      app.use((ctx) => { ctx.body = 'never'; });
    });
    const res = await post(url, undefined);
    const expected = problemResponse(new KeyError('ERR_IDEMKIT_KEY_MISSING', 400, 'This request needs an Idempotency-Key header (or an `idempotencyKey` field in its JSON body).'));
    expect(res.status).toBe(400);
    expect(res.headers.get('content-type')).toBe('application/problem+json');
    expect(Buffer.from(await res.arrayBuffer()).equals(Buffer.from(expected.body))).toBe(true);
    expect(seen).toEqual(['ERR_IDEMKIT_KEY_MISSING']);
  });

  it.each([
    ['a status only', (ctx: Context): void => { ctx.status = 429; }, 429],
    ["Koa's 404, set on purpose", (ctx: Context): void => { ctx.status = 404; }, 404],
    ['ctx.body = null', (ctx: Context): void => { ctx.body = null; }, 204],
  ] as const)('an onProblem that answers with %s keeps its answer', async (_name, onProblem, status) => {
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore(), onProblem }));
      app.use((ctx) => { ctx.body = 'never'; });
    });
    const res = await post(url, undefined);
    expect(res.status).toBe(status);
    expect(res.headers.get('content-type')).not.toBe('application/problem+json');
  });

  it('onProblem is not called for the stored 410 of a streamed answer: its retries replay it as stored', async () => {
    const problems: number[] = [];
    const { url } = await start((app) => {
      app.use(
        idempotency({
          store: createMemoryStore(),
          onProblem: (ctx, error) => {
            problems.push(error.status);
            ctx.status = error.status;
            ctx.body = { code: error.code };
          },
        }),
      );
      app.use((ctx) => {
        ctx.body = Readable.from(['part 1, ', 'part 2']);
      });
    });
    expect((await post(url, 'streamed')).status).toBe(200);
    const retry = await post(url, 'streamed');
    expect(retry.status).toBe(410);
    expect(retry.headers.get('idempotent-replayed')).toBe('true');
    expect(await retry.json()).toMatchObject({ reason: 'not-bufferable', originalStatus: 200 });
    expect(problems).toEqual([]);
  });

  it('app.use(idempotency), the factory uncalled: each request fails with an error that says so, not "missing store"', async () => {
    const errors: Error[] = [];
    const { url } = await start((app) => {
      app.use(idempotency as unknown as Middleware);
      app.use((ctx) => void (ctx.body = 'ran'));
      app.on('error', (error: Error) => errors.push(error));
    });
    const res = await post(url, 'k');
    expect(res.status).toBe(500);
    expect(errors).toHaveLength(1);
    expect(errors[0]).toBeInstanceOf(ConfigurationError);
    expect(errors[0]!.message).toContain('app.use(idempotency({ store }))');
  });

  it('rejects a non-function onProblem at setup', () => {
    expect(() => idempotency({ store: createMemoryStore(), onProblem: 'x' as never })).toThrow(ConfigurationError);
  });

  it('does not pass onProblem to the engine (no unknown-option warning)', () => {
    const warn = vi.fn();
    idempotency({ store: createMemoryStore(), onProblem: () => undefined, logger: { warn, error: vi.fn() } });
    expect(warn).not.toHaveBeenCalled();
  });
});

describe('koa binding: body parsing', () => {
  it('answers 415 (ERR_IDEMKIT_BODY_NOT_PARSED) when no body parser read the body, and logs it once', async () => {
    const errors: unknown[] = [];
    const warn = vi.fn();
    let runs = 0;
    const { url, app } = await start(
      (a) => {
        a.use(idempotency({ store: createMemoryStore(), logger: { warn, error: vi.fn() } }));
        a.use((ctx) => { runs++; ctx.body = 'ran'; });
      },
      { parser: false },
    );
    app.on('error', (err: unknown) => errors.push(err));
    // As koa-body leaves it for a type it does not parse: before, any client could cause 500s.
    for (const key of ['no-parser-1', 'no-parser-2']) {
      const res = await post(url, key);
      expect(res.status).toBe(415);
      expect(await res.text()).toContain('no body parser read');
    }
    expect(runs).toBe(0);
    expect(errors).toHaveLength(2);
    expect(errors[0]).toBeInstanceOf(ConfigurationError);
    expect(errors[0]).toMatchObject({ code: 'ERR_IDEMKIT_BODY_NOT_PARSED' });
    expect(warn).toHaveBeenCalledTimes(1);
    expect(warn.mock.calls[0]?.[0]).toContain('Answered 415');
  });

  // Was: a DELETE covered through `methods` was told to put its (enabled) type in `enableTypes`;
  // the parsers read only POST, PUT and PATCH bodies unless `parsedMethods` says otherwise.
  it('a covered DELETE whose body the parser skipped is told about parsedMethods; with it, it runs once and replays', async () => {
    const del = (url: string, body: string) =>
      fetch(url, { method: 'DELETE', headers: { 'content-type': 'application/json', 'idempotency-key': 'del-1' }, body });
    for (const parsedMethods of [undefined, ['POST', 'PUT', 'PATCH', 'DELETE']]) {
      let runs = 0;
      const { url } = await start(
        (a) => {
          a.use(bodyParser(parsedMethods === undefined ? {} : { parsedMethods }));
          a.use(idempotency({ store: createMemoryStore(), methods: ['DELETE'], logger: false }));
          a.use((ctx) => {
            runs++;
            ctx.status = 201;
            ctx.body = { deleted: true };
          });
        },
        { parser: false },
      );
      const first = await del(url, '{"a":1}');
      if (parsedMethods === undefined) {
        expect(first.status).toBe(415);
        expect(await first.text()).toContain("add DELETE to @koa/bodyparser's `parsedMethods`");
        expect(runs).toBe(0);
      } else {
        expect(first.status).toBe(201);
        expect((await del(url, '{"a":1}')).headers.get('idempotent-replayed')).toBe('true');
        expect((await del(url, '{"a":2}')).status).toBe(422);
        expect(runs).toBe(1);
      }
    }
  });

  it("an upload's file bytes are part of the fingerprint (koa-body multipart): another file under the same key is a 422", async () => {
    let runs = 0;
    const warn = vi.fn();
    const { url } = await start(
      (a) => {
        a.use(koaBody({ multipart: true }));
        a.use(idempotency({ store: createMemoryStore(), logger: { warn, error: vi.fn() } }));
        a.use((ctx) => {
          runs++;
          const file = ctx.request.files?.['doc'];
          const path = Array.isArray(file) ? file[0]?.filepath : file?.filepath;
          ctx.status = 201;
          ctx.body = { run: runs, file: path === undefined ? null : readFileSync(path, 'utf8') };
        });
      },
      { parser: false },
    );
    const upload = (content: string) =>
      fetch(url, {
        method: 'POST',
        headers: { 'idempotency-key': 'invoice-1', 'content-type': 'multipart/form-data; boundary=X' },
        body: `--X\r\nContent-Disposition: form-data; name="amount"\r\n\r\n10\r\n--X\r\nContent-Disposition: form-data; name="doc"; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n${content}\r\n--X--\r\n`,
      });
    const first = await upload('invoice for ALICE');
    expect(first.status).toBe(201);
    expect(await first.json()).toEqual({ run: 1, file: 'invoice for ALICE' });
    // Before, only the fields were fingerprinted: BOB's upload got ALICE's answer.
    expect((await upload('invoice for BOB')).status).toBe(422);
    const again = await upload('invoice for ALICE');
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect(runs).toBe(1);
    expect(warn).not.toHaveBeenCalled();
  });

  it('a request without a key is never refused for its unparsed body: 400 for a missing key, or through with required: false', async () => {
    for (const required of [true, false]) {
      const warn = vi.fn();
      const { url } = await start(
        (a) => {
          a.use(idempotency({ store: createMemoryStore(), logger: { warn, error: vi.fn() }, required }));
          // A webhook that reads its raw body itself.
          a.use((ctx) => { ctx.status = 204; });
        },
        { parser: false },
      );
      // Before, both were 415: the body check came before the key lookup.
      const keyless = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/xml' }, body: '<order/>' });
      expect(keyless.status).toBe(required ? 400 : 204);
      expect((await post(url, `keyed-${String(required)}`)).status).toBe(415);
      // A JSON webhook (Stripe's) passes with required: false. With required: true its body may
      // hold the key itself (`idempotencyKey`): unread, it is refused rather than told "no key".
      const bodyKey = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"idempotencyKey":"k1"}' });
      expect(bodyKey.status).toBe(required ? 415 : 204);
      if (!required) {
        // Passed through, but a key in that unread body would not be seen: said once.
        await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"idempotencyKey":"k1"}' });
        expect(warn.mock.calls.filter(([message]) => String(message).includes('would not be seen'))).toHaveLength(1);
      }
    }
  });

  it('needs no parser for a bodiless request', async () => {
    const { url } = await start(
      (a) => {
        a.use(idempotency({ store: createMemoryStore() }));
        a.use((ctx) => { ctx.body = 'ran'; });
      },
      { parser: false },
    );
    const res = await fetch(url, { method: 'POST', headers: { 'idempotency-key': 'empty' } });
    expect(await res.text()).toBe('ran');
  });

  it('needs no parser when neither the fingerprint nor the key reads the body', async () => {
    const { url } = await start(
      (a) => {
        a.use(idempotency({ store: createMemoryStore(), fingerprint: false, bodyField: false }));
        a.use((ctx) => { ctx.body = 'ran'; });
      },
      { parser: false },
    );
    expect(await (await post(url, 'fp-off')).text()).toBe('ran');
  });

  it('refuses with 415 (logged once) a body @koa/bodyparser left as {}: two bodies must not look alike', async () => {
    const warn = vi.fn();
    let runs = 0;
    const { url } = await start((a) => {
      a.use(idempotency({ store: createMemoryStore(), logger: { warn, error: vi.fn() } }));
      a.use((ctx) => { ctx.body = `ran ${++runs}`; });
    });
    const send = (body: string, headers: Record<string, string>) => fetch(url, { method: 'POST', headers: { 'idempotency-key': 'raw-1', ...headers }, body });
    // Before, both ran as one request: the second, another body under the same key, got the first one's answer.
    for (const body of ['xyz', 'abc']) {
      const refused = await send(body, { 'content-type': 'application/octet-stream' });
      expect(refused.status).toBe(415);
      expect(await refused.text()).toContain('no body parser read');
    }
    expect((await send('<order/>', { 'content-type': 'application/xml' })).status).toBe(415);
    // A JSON type this parser skips: the content type alone cannot tell, the unread stream does.
    expect((await send('{"a":1}', { 'content-type': 'application/merge-patch+json' })).status).toBe(415);
    expect(runs).toBe(0);
    expect(warn).toHaveBeenCalledTimes(1);
    expect(String(warn.mock.calls[0]![0])).toContain('application/octet-stream');
    // JSON the parser did read, {} included, is fingerprinted as ever.
    const json = (text: string) => fetch(url, { method: 'POST', headers: { 'idempotency-key': 'json-1', 'content-type': 'application/json' }, body: text });
    expect(await (await json('{}')).text()).toBe('ran 1');
    expect((await json('{}')).headers.get('idempotent-replayed')).toBe('true');
    expect((await json('{"a":1}')).status).toBe(422);
  });

  it('a body a parser did read as {} is fingerprinted, whatever its type (koa-body, application/csp-report)', async () => {
    let runs = 0;
    const warn = vi.fn();
    const { url } = await start(
      (a) => {
        a.use(koaBody({ jsonLimit: '1kb' }));
        a.use(idempotency({ store: createMemoryStore(), logger: { warn, error: vi.fn() } }));
        a.use((ctx) => { ctx.body = { run: ++runs }; });
      },
      { parser: false },
    );
    const send = (body: string) => fetch(url, { method: 'POST', headers: { 'idempotency-key': 'csp', 'content-type': 'application/csp-report' }, body });
    expect(await (await send('{}')).json()).toEqual({ run: 1 });
    expect((await send('{}')).headers.get('idempotent-replayed')).toBe('true');
    expect((await send('{"csp-report":{}}')).status).toBe(422);
    expect(runs).toBe(1);
    // Nor is it reported as unparsed (before, koa-body's {} always was: it keeps no rawBody).
    expect(warn).not.toHaveBeenCalled();
  });

  it('fingerprints raw Buffer bodies from a raw-body middleware: different bytes → 422', async () => {
    const { url } = await start((a) => {
      a.use(rawBody());
      a.use(idempotency({ store: createMemoryStore() }));
      a.use((ctx) => { ctx.body = Buffer.from(ctx.request.body as Buffer).reverse(); });
    }, { parser: false });
    const send = (bytes: number[]): Promise<Response> =>
      fetch(url, { method: 'POST', headers: { 'idempotency-key': 'raw', 'content-type': 'application/octet-stream' }, body: new Uint8Array(bytes) });
    expect([...new Uint8Array(await (await send([1, 2, 3])).arrayBuffer())]).toEqual([3, 2, 1]);
    expect((await send([1, 2, 3])).headers.get('idempotent-replayed')).toBe('true');
    expect((await send([1, 2, 4])).status).toBe(422);
  });
});

describe('koa binding: @koa/router', () => {
  it('works per route: only the guarded route needs a key', async () => {
    let runs = 0;
    const { url } = await start((app) => {
      const router = new Router();
      router.post('/orders', idempotency({ store: createMemoryStore() }), (ctx) => {
        runs++;
        ctx.status = 201;
        ctx.body = { n: runs, key: ctx.state.idempotency?.key };
      });
      router.post('/free', (ctx) => { ctx.body = { free: ctx.state.idempotency ?? 'unset' }; });
      app.use(router.routes());
    });
    const first = await post(`${url}/orders`, 'r1');
    expect(await first.json()).toEqual({ n: 1, key: 'r1' });
    const replay = await post(`${url}/orders`, 'r1');
    expect(await replay.json()).toEqual({ n: 1, key: 'r1' });
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect((await post(`${url}/orders`, undefined)).status).toBe(400);
    expect(await (await post(`${url}/free`, undefined)).json()).toEqual({ free: 'unset' });
  });

  it('app-wide and per-route together: the outer one claims the key, the inner one steps aside', async () => {
    let runs = 0;
    const store = createMemoryStore();
    const { url } = await start((app) => {
      const router = new Router();
      router.post('/orders', idempotency({ store }), (ctx) => {
        runs++;
        ctx.body = { n: runs };
      });
      app.use(idempotency({ store }));
      app.use(router.routes());
    });
    const first = await post(`${url}/orders`, 'both');
    expect(first.status).toBe(200);
    expect((await post(`${url}/orders`, 'both')).headers.get('idempotent-replayed')).toBe('true');
    expect(runs).toBe(1);
  });

  it('exposes ctx.state.idempotency while running, null when not covered', async () => {
    const seen: unknown[] = [];
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore() }));
      app.use((ctx) => {
        seen.push(ctx.state.idempotency);
        ctx.body = 'ok';
      });
    });
    await post(url, 'ctx-key');
    await fetch(url);
    expect(seen).toEqual([{ key: 'ctx-key', tookOver: false, transaction: undefined }, null]);
  });
});

describe('koa binding: an app with a state type of its own', () => {
  it('reads ctx.state.idempotency through IdempotencyState (Koa<AppState & IdempotencyState>)', async () => {
    interface AppState {
      user: string;
    }
    // Typed as such an app's handlers are; without IdempotencyState this did not compile.
    const handler: Middleware<AppState & IdempotencyState> = (ctx) => {
      ctx.body = { user: ctx.state.user, key: ctx.state.idempotency?.key ?? null };
    };
    const { url } = await start((app) => {
      app.use(async (ctx, next) => {
        (ctx.state as AppState).user = 'ann';
        await next();
      });
      app.use(idempotency({ store: createMemoryStore() }));
      app.use(handler as Middleware);
    });
    expect(await (await post(url, 'typed-state')).json()).toEqual({ user: 'ann', key: 'typed-state' });
  });
});

describe('koa binding: concurrency and disconnects', () => {
  describe('a timeout middleware mounted before idempotency() answers 503 while the handler runs', () => {
    async function withTimeout(
      outcome: () => Promise<'ok' | 'fail'>,
      { standIn = 503, rawAnswer = false, store = createMemoryStore(), leaseMs }: { standIn?: number; rawAnswer?: boolean; store?: IdempotencyStore; leaseMs?: number } = {},
    ): Promise<{ url: string; runs: () => number }> {
      let runs = 0;
      let requests = 0;
      const { url } = await start((app) => {
        app.use(async (ctx, next) => {
          // Only the first request is meant to time out; its retries get a long timeout, so a slow
          // machine cannot turn their 409 or replay into a 503.
          const ms = requests++ === 0 ? 100 : 10_000;
          let timer: NodeJS.Timeout | undefined;
          const timedOut = new Promise<void>((resolve) => {
            timer = setTimeout(() => {
              ctx.status = standIn;
              ctx.body = { error: 'timeout' };
              resolve();
            }, ms);
          });
          await Promise.race([next(), timedOut]);
          clearTimeout(timer);
        });
        app.use(idempotency({ store, leaseMs }));
        app.use(async (ctx) => {
          runs++;
          if ((await outcome()) === 'fail') throw new Error('card declined');
          // A handler that answers through ctx.res itself, once its work is done.
          if (rawAnswer) ctx.respond = false;
          ctx.status = 201;
          ctx.body = { charged: runs };
        });
      });
      return { url, runs: () => runs };
    }

    it('retries get 409 while it runs; once it finished they get 410 cut-short, never a second run', async () => {
      let open!: () => void;
      const gate = new Promise<'ok'>((resolve) => (open = () => resolve('ok')));
      const { url, runs } = await withTimeout(() => gate);
      expect((await post(url, 'k')).status).toBe(503);
      const retries = await Promise.all(Array.from({ length: 10 }, () => post(url, 'k').then((r) => r.status)));
      expect(retries).toEqual(Array(10).fill(409));
      open();
      // Before, Koa kept the 503 status it had sent, the key was freed, and the retry charged again.
      await vi.waitFor(async () => {
        const after = await post(url, 'k');
        expect(after.status).toBe(410);
        expect(await after.json()).toMatchObject({ reason: 'cut-short' });
      }, { timeout: 10_000 });
      expect(runs()).toBe(1);
    });

    // Was: the lease was renewed for as long as the handler hung, so every retry got 409 for the
    // life of the process: the very case a timeout middleware is there for.
    it.each([503, 202])('a handler that never finishes (stand-in %i): 410 cut-short a lease later, not 409 for good, never a second run', async (standIn) => {
      const { url, runs } = await withTimeout(() => new Promise<never>(() => undefined), { standIn, leaseMs: 300 });
      expect((await post(url, 'k')).status).toBe(standIn);
      const retry = await vi.waitFor(
        async () => {
          const reply = await post(url, 'k');
          expect(reply.status).toBe(410);
          return reply;
        },
        { timeout: 5_000, interval: 100 },
      );
      expect(await retry.json()).toMatchObject({ reason: 'cut-short', originalStatus: null });
      expect(runs()).toBe(1);
    });

    it('a handler that turns to ctx.respond = false once done is never run twice either', async () => {
      let open!: () => void;
      const gate = new Promise<'ok'>((resolve) => (open = () => resolve('ok')));
      const { url, runs } = await withTimeout(() => gate, { rawAnswer: true });
      expect((await post(url, 'k')).status).toBe(503);
      open();
      await vi.waitFor(async () => expect((await post(url, 'k')).status).toBe(410), { timeout: 10_000 });
      expect(runs()).toBe(1);
    });

    it('a storable stand-in (202) and a handler that then throws: the key is freed all the same', async () => {
      let fail!: () => void;
      const gate = new Promise<'fail'>((resolve) => (fail = () => resolve('fail')));
      let second = false;
      const { url, runs } = await withTimeout(() => (second ? Promise.resolve('ok') : ((second = true), gate)), { standIn: 202 });
      expect((await post(url, 'k')).status).toBe(202);
      fail();
      await vi.waitFor(async () => expect((await post(url, 'k')).status).toBe(201), { timeout: 10_000 });
      expect(runs()).toBe(2);
    });

    // Was: the handler ran behind the 503 already sent, and the key answered 410 cut-short for good.
    it('answered while the key was still being claimed (a slow store): the handler never runs behind it, the retry runs it', async () => {
      const store = new SlowBeginStore();
      store.delayMs = 400; // the timeout answers at 100 ms
      const { url, runs } = await withTimeout(() => Promise.resolve('ok'), { store });
      expect((await post(url, 'k')).status).toBe(503);
      store.delayMs = 0;
      // 409 until the claim's answer came back; then the key is free again.
      await vi.waitFor(async () => expect((await post(url, 'k')).status).toBe(201), { timeout: 10_000 });
      expect(runs()).toBe(1);
    });

    it('with concurrency: "wait", answered while it waited its turn: it does not run once the key is free, the retry does', async () => {
      let runs = 0;
      let fail!: () => void;
      const gate = new Promise<void>((resolve) => (fail = resolve));
      const store = createMemoryStore();
      const executed: string[] = [];
      const { url } = await start((app) => {
        app.use(async (ctx, next) => {
          // Only the request that waits its turn times out.
          let timer: NodeJS.Timeout | undefined;
          const timedOut = new Promise<void>((resolve) => {
            timer = setTimeout(() => {
              ctx.status = 503;
              ctx.body = { error: 'timeout' };
              resolve();
            }, ctx.get('x-wait') === '' ? 10_000 : 100);
          });
          await Promise.race([next(), timedOut]);
          clearTimeout(timer);
        });
        app.use(idempotency({ store, concurrency: 'wait', waitTimeoutMs: 10_000, onEvent: (e) => void (e.type === 'executed' && executed.push(e.key)) }));
        app.use(async (ctx) => {
          runs++;
          if (runs === 1) {
            await gate;
            throw new Error('card declined'); // frees the key for the request that waits
          }
          ctx.status = 201;
          ctx.body = { charged: runs };
        });
      });
      const first = post(url, 'k');
      await vi.waitFor(() => expect(runs).toBe(1), { timeout: 10_000 });
      expect((await post(url, 'k', { a: 1 }, { 'x-wait': '1' })).status).toBe(503);
      fail();
      expect((await first).status).toBe(500);
      // The waiting request claimed the key freed by the throw; once it settled, the retry comes.
      await vi.waitFor(async () => {
        expect(executed).toHaveLength(2);
        expect((await store.get(scopedKey(undefined, 'k')))?.state).not.toBe('in_progress');
      }, { timeout: 10_000 });
      const retry = await post(url, 'k');
      expect(retry.status).toBe(201);
      expect(await retry.json()).toEqual({ charged: 2 });
      expect(runs).toBe(2);
    });

    it('a handler that then throws frees the key: the retry runs it again', async () => {
      let fail!: () => void;
      const gate = new Promise<'fail'>((resolve) => (fail = () => resolve('fail')));
      let second = false;
      const { url, runs } = await withTimeout(() => (second ? Promise.resolve('ok') : ((second = true), gate)));
      expect((await post(url, 'k')).status).toBe(503);
      fail();
      await vi.waitFor(async () => expect((await post(url, 'k')).status).toBe(201), { timeout: 10_000 });
      expect(runs()).toBe(2);
    });
  });

  it('50 parallel requests with one key run the handler once; the other 49 get 409 while it runs', async () => {
    let runs = 0;
    let open!: () => void;
    const gate = new Promise<void>((resolve) => (open = resolve));
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore() }));
      app.use(async (ctx) => {
        runs++;
        await gate; // held until the 49 duplicates have been answered: no timing assumptions
        ctx.status = 201;
        ctx.body = { created: true };
      });
    });
    let answered = 0;
    const pending = Array.from({ length: 50 }, () =>
      post(url, 'same').then((r) => {
        answered++;
        return r;
      }),
    );
    await vi.waitFor(() => expect(answered).toBe(49), { timeout: 15_000 });
    open();
    const responses = await Promise.all(pending);
    const statuses = responses.map((r) => r.status);
    expect(runs).toBe(1);
    expect(statuses.filter((s) => s === 201)).toHaveLength(1);
    expect(statuses.filter((s) => s === 409)).toHaveLength(49);
    for (const r of responses.filter((x) => x.status === 409)) expect(Number(r.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    const after = await post(url, 'same');
    expect(after.status).toBe(201);
    expect(after.headers.get('idempotent-replayed')).toBe('true');
  });

  it('with concurrency: "wait", 50 parallel requests all get the one result', async () => {
    let runs = 0;
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore(), concurrency: 'wait' }));
      app.use(async (ctx) => {
        runs++;
        await new Promise((resolve) => setTimeout(resolve, 100));
        ctx.status = 201;
        ctx.body = { run: runs };
      });
    });
    const responses = await Promise.all(Array.from({ length: 50 }, () => post(url, 'wait')));
    const bodies = await Promise.all(responses.map((r) => r.json()));
    expect(runs).toBe(1);
    expect(responses.every((r) => r.status === 201)).toBe(true);
    expect(bodies.every((b) => JSON.stringify(b) === '{"run":1}')).toBe(true);
    expect(responses.filter((r) => r.headers.get('idempotent-replayed') === 'true')).toHaveLength(49);
  });

  it('a client that leaves mid-handler: the finished answer is stored, its retry gets the replay', async () => {
    let runs = 0;
    let clientGone = false;
    let open!: () => void;
    const gate = new Promise<void>((resolve) => (open = resolve));
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore() }));
      app.use(async (ctx) => {
        runs++;
        ctx.res.once('close', () => (clientGone = true));
        await gate; // opened only once the server has seen the client leave
        ctx.status = 201;
        ctx.body = { done: true };
      });
    });
    await leaveWhileRunning(url, 'left', () => runs === 1);
    await vi.waitFor(() => expect(clientGone).toBe(true), { timeout: 10_000 });
    // While the handler still runs, the retry waits its turn (409), it does not run again.
    const early = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': 'left' }, body: '{}' });
    expect(early.status).toBe(409);
    open();
    await vi.waitFor(async () => {
      const retry = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': 'left' }, body: '{}' });
      expect(retry.status).toBe(201);
      expect(retry.headers.get('idempotent-replayed')).toBe('true');
    }, { timeout: 10_000 });
    expect(runs).toBe(1);
  });

  // Was: Node never closes a queued response whose socket died, so the key answered 409 for the
  // life of the process (its lease renewed; in transactional mode, the transaction held open).
  it('ctx.respond = false, pipelined behind a slow answer, the connection dies first: the key is settled all the same', async () => {
    let runs = 0;
    let openSlow!: () => void;
    const slow = new Promise<void>((resolve) => (openSlow = resolve));
    let slowClosed = false;
    const store = createMemoryStore();
    const { url } = await start((app) => {
      app.use(async (ctx, next) => {
        if (ctx.path !== '/slow') return next();
        ctx.res.once('close', () => (slowClosed = true));
        await slow;
        ctx.body = 'slow';
      });
      app.use(idempotency({ store, leaseMs: 1_000 }));
      app.use((ctx) => {
        runs++;
        ctx.respond = false;
        ctx.res.writeHead(201, { 'content-type': 'text/plain' });
        ctx.res.end('raw');
      });
    });
    const socket = await pipelinedBehindSlow(url, '/raw', 'piped');
    await vi.waitFor(() => expect(runs).toBe(1), { timeout: 10_000 });
    socket.destroy(); // before the raw 201, queued behind /slow, could go out
    await vi.waitFor(() => expect(slowClosed).toBe(true), { timeout: 10_000 }); // the server saw it
    openSlow();
    // Within a few leases the key is settled: the handler answered, so it is never run again.
    await vi.waitFor(async () => expect((await store.get(scopedKey(undefined, 'piped')))?.state).toBe('completed'), { timeout: 5_000 });
    const retry = await post(`${url}/raw`, 'piped');
    expect(retry.status).toBe(410);
    expect(runs).toBe(1);
  });

  // Was: the lease was renewed for as long as the handler hung, so every retry got 409 with
  // Retry-After for the life of the process (Express and Fastify mark the key a lease later).
  it('a handler that never finishes once its client left: 410 cut-short a lease later, not 409 for good, never a second run', async () => {
    let runs = 0;
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore(), leaseMs: 300 }));
      app.use(async () => {
        runs++;
        await new Promise<never>(() => undefined); // an upstream call that never comes back
      });
    });
    await leaveWhileRunning(url, 'hung', () => runs === 1);
    const retry = await postUntil(410, url, 'hung', {});
    expect(await retry.json()).toMatchObject({ reason: 'cut-short' });
    expect(runs).toBe(1);
  });

  it('transactional: a handler that finishes within a lease of its client leaving (just before a renewal) commits, and the retry replays it', async () => {
    let runs = 0;
    let renewals = 0;
    let rolledBack = 0;
    let committed = 0;
    const memory = createMemoryStore();
    const store: TransactionalStore<null> = Object.assign(memory, {
      renew: (...args: Parameters<MemoryStore['renew']>) => {
        renewals++;
        return MemoryStore.prototype.renew.apply(memory, args);
      },
      async beginTransaction(): Promise<StoreTransaction<null>> {
        return {
          client: null,
          complete: (...args: Parameters<MemoryStore['complete']>) => {
            committed++;
            return memory.complete(...args);
          },
          rollback: async () => void rolledBack++,
        };
      },
    });
    const leaseMs = 3_000;
    const abort = new AbortController();
    let done!: () => void;
    const finished = new Promise<void>((resolve) => (done = resolve));
    let renewalsAtLeave = -1;
    const { url } = await start((app) => {
      app.use(idempotency({ store, transactional: true, leaseMs, logger: false }));
      app.use(async (ctx) => {
        runs++;
        // The client leaves just before the lease's first renewal (due a third of a lease after
        // the claim), then the handler needs most of a lease more, but less than one.
        await new Promise((resolve) => setTimeout(resolve, 850));
        renewalsAtLeave = renewals;
        abort.abort();
        await new Promise((resolve) => setTimeout(resolve, 0.8 * leaseMs));
        ctx.status = 201;
        ctx.body = { runs };
        done();
      });
    });
    const aborted = post(url, 'late-tx', {}, {}, abort.signal).catch(() => 'aborted');
    expect(await aborted).toBe('aborted');
    await finished;
    expect(renewalsAtLeave).toBe(0);
    // As without transactions (the key is marked cut short only a whole lease after the leave):
    // its answer is stored and replayed, the operation ran once.
    const retry = await post(url, 'late-tx', {});
    expect({ status: retry.status, replayed: retry.headers.get('idempotent-replayed'), runs, rolledBack, committed }).toEqual({ status: 201, replayed: 'true', runs: 1, rolledBack: 0, committed: 1 });
  });

  it('transactional: a handler that never finishes once its client left has its transaction rolled back a lease later, and the retry runs on a clean slate', async () => {
    let runs = 0;
    let rolledBack = 0;
    const store: TransactionalStore<null> = Object.assign(createMemoryStore(), {
      async beginTransaction(): Promise<StoreTransaction<null>> {
        return { client: null, complete: async () => true, rollback: async () => void rolledBack++ };
      },
    });
    const { url } = await start((app) => {
      app.use(idempotency({ store, transactional: true, leaseMs: 300, logger: false }));
      app.use(async (ctx) => {
        runs++;
        if (runs === 1) await new Promise<never>(() => undefined);
        ctx.status = 201;
        ctx.body = { runs };
      });
    });
    await leaveWhileRunning(url, 'hung-tx', () => runs === 1);
    // Not a marker: it would commit the writes of a handler still running.
    await vi.waitFor(async () => expect((await post(url, 'hung-tx', {})).status).toBe(201), { timeout: 5_000, interval: 100 });
    expect(rolledBack).toBe(1);
    expect(runs).toBe(2);
  });

  it.each(['HTTP/1.1', 'HTTP/2'])('%s: a client that left while the key was being claimed, and a handler that never finishes: 410 cut-short a lease later', async (protocol) => {
    let claimed!: () => void;
    const gate = new Promise<void>((resolve) => (claimed = resolve));
    /** begin() answers only once the server has seen the client leave. */
    class GatedBeginStore extends MemoryStore {
      override async begin(...args: Parameters<MemoryStore['begin']>): ReturnType<MemoryStore['begin']> {
        const result = await super.begin(...args);
        if (args[0].endsWith('first')) await gate;
        return result;
      }
    }
    let runs = 0;
    let entered = false;
    let closed = false;
    const app = new Koa();
    app.silent = true;
    app.use(async (ctx, next) => {
      entered = true;
      ctx.res.once('close', () => (closed = true));
      await next();
    });
    app.use(idempotency({ store: new GatedBeginStore(), leaseMs: 300, logger: false }));
    app.use(async () => {
      runs++;
      await new Promise<never>(() => undefined);
    });
    const { send, close } = await serveOver(app, protocol);
    try {
      await send('first', () => entered);
      await vi.waitFor(() => expect(closed).toBe(true), { timeout: 10_000 });
      claimed();
      await vi.waitFor(() => expect(runs).toBe(1), { timeout: 10_000 });
      const retry = await vi.waitFor(
        async () => {
          const reply = await send('first');
          expect(reply.status).toBe(410);
          return reply;
        },
        { timeout: 5_000, interval: 100 },
      );
      expect(JSON.parse(retry.text)).toMatchObject({ reason: 'cut-short' });
      expect(runs).toBe(1);
    } finally {
      close();
    }
  });

  // Was: Node's HTTP/2 compat response emits 'finish' (before 'close') for a stream the client
  // cancelled, with nothing written: it was taken for an answer a timeout middleware sent, so a
  // handler that finished right after its client left had its answer thrown away (410 cut-short)
  // where HTTP/1.1 stores it and the retry gets the replay.
  it.each(['HTTP/1.1', 'HTTP/2'])('%s: a handler that finishes soon after its client left has its answer replayed to the retry, not 410', async (protocol) => {
    let runs = 0;
    let finish!: () => void;
    const gate = new Promise<void>((resolve) => (finish = resolve));
    let closed = false;
    const app = new Koa();
    app.silent = true;
    app.use(idempotency({ store: createMemoryStore(), leaseMs: 5_000, logger: false }));
    app.use(async (ctx) => {
      runs++;
      ctx.res.once('close', () => (closed = true));
      if (runs === 1) await gate;
      ctx.status = 201;
      ctx.body = { charged: runs };
    });
    const { send, close } = await serveOver(app, protocol);
    try {
      await send('soon', () => runs === 1);
      await vi.waitFor(() => expect(closed).toBe(true), { timeout: 10_000 }); // the server saw it leave
      finish();
      const retry = await vi.waitFor(
        async () => {
          const reply = await send('soon');
          expect(reply.status).not.toBe(409);
          return reply;
        },
        { timeout: 10_000, interval: 50 },
      );
      expect(retry).toEqual({ status: 201, text: JSON.stringify({ charged: 1 }) });
      expect(runs).toBe(1);
    } finally {
      close();
    }
  });

  // Was: a request pipelined behind a slow answer has a response with no socket yet, and Node
  // never closes it when the connection dies, so 'close' never told that its client left: a
  // handler hung on it held its key for good (409 to every retry, its lease renewed).
  it('pipelined behind a slow answer, the connection dies, the handler never finishes: 410 cut-short a lease later, not 409 for good', async () => {
    let runs = 0;
    let slowClosed = false;
    const { url } = await start((app) => {
      app.use(async (ctx, next) => {
        if (ctx.path !== '/slow') return next();
        ctx.res.once('close', () => (slowClosed = true));
        await new Promise<never>(() => undefined);
      });
      app.use(idempotency({ store: createMemoryStore(), leaseMs: 300, logger: false }));
      app.use(async () => {
        runs++;
        await new Promise<never>(() => undefined); // an upstream call that never comes back
      });
    });
    const socket = await pipelinedBehindSlow(url, '/hang', 'piped-hung');
    await vi.waitFor(() => expect(runs).toBe(1), { timeout: 10_000 });
    socket.destroy();
    await vi.waitFor(() => expect(slowClosed).toBe(true), { timeout: 10_000 }); // the server saw it
    const retry = await postUntil(410, `${url}/hang`, 'piped-hung');
    expect(await retry.json()).toMatchObject({ reason: 'cut-short' });
    expect(runs).toBe(1);
  });

  // Was: the key was settled only once the handler returned, and nothing watched a handler that
  // had sent its whole raw answer and then hung (an analytics call without a timeout, after the
  // answer): 409 to every retry for the life of the process, its lease renewed.
  it('ctx.respond = false, a whole raw answer sent, then a hang: settled by that answer a lease later, not held for good', async () => {
    let runs = 0;
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore(), leaseMs: 300, logger: false }));
      app.use(async (ctx) => {
        runs++;
        ctx.respond = false;
        ctx.res.writeHead(201, { 'content-type': 'text/plain' });
        ctx.res.end('raw');
        await new Promise<never>(() => undefined); // follow-up work that never comes back
      });
    });
    const first = await post(url, 'raw-then-hung', {});
    expect([first.status, await first.text()]).toEqual([201, 'raw']);
    const retry = await postUntil(410, url, 'raw-then-hung', {});
    expect(await retry.json()).toMatchObject({ reason: 'not-bufferable', originalStatus: 201 });
    expect(runs).toBe(1);
  });

  it('a handler slower than a lease whose client left: its late answer is not replayed, but it never runs twice', async () => {
    let runs = 0;
    let answer!: () => void;
    const late = new Promise<void>((resolve) => (answer = resolve));
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore(), leaseMs: 300 }));
      app.use(async (ctx) => {
        runs++;
        await late;
        ctx.status = 201;
        ctx.body = `charge ${runs}`;
      });
    });
    await leaveWhileRunning(url, 'late', () => runs === 1);
    await vi.waitFor(async () => expect((await post(url, 'late', {})).status).toBe(410), { timeout: 5_000, interval: 100 });
    answer();
    expect((await post(url, 'late', {})).status).toBe(410);
    expect(runs).toBe(1);
  });

  it('a handler that throws after its client left releases the key as client-gone', async () => {
    const events: IdempotencyEvent[] = [];
    let entered = false;
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore(), onEvent: (e) => events.push(e) }));
      app.use(async (ctx) => {
        entered = true;
        await new Promise<void>((resolve) => ctx.res.once('close', () => resolve()));
        throw new Error('aborted work');
      });
    });
    const abort = new AbortController();
    const aborted = fetch(url, { method: 'POST', headers: { 'idempotency-key': 'gone2' }, signal: abort.signal }).catch(() => 'aborted');
    await vi.waitFor(() => expect(entered).toBe(true), { timeout: 10_000 });
    abort.abort();
    await aborted;
    await vi.waitFor(() => expect(events).toContainEqual({ type: 'released', key: 'gone2', reason: 'client-gone' }), { timeout: 10_000 });
  });
});

// Was: Koa's own 404 and allowedMethods()'s 405 were stored under the key for the TTL, so the
// retry on an instance with the route (a rolling deploy) or to the corrected path got that answer
// replayed, or a 422.
describe('koa binding: an answer no route gave', () => {
  it("Koa's own 404 and allowedMethods()'s 405 are not stored: the retry to the route runs once", async () => {
    let runs = 0;
    const store = createMemoryStore();
    const { url } = await start((app) => {
      const router = new Router();
      router.post('/pay', (ctx) => {
        ctx.status = 201;
        ctx.body = { run: ++runs };
      });
      router.get('/stats', (ctx) => void (ctx.body = {}));
      app.use(idempotency({ store }));
      app.use(router.routes());
      app.use(router.allowedMethods());
    });
    const key = 'typo-then-fix';
    expect((await post(`${url}/paymnts`, key, { cents: 100 })).status).toBe(404);
    expect((await post(`${url}/stats`, key, { cents: 100 })).status).toBe(405);
    expect(store.size).toBe(0);
    const fixed = await post(`${url}/pay`, key, { cents: 100 });
    expect(fixed.status).toBe(201);
    expect(fixed.headers.get('idempotent-replayed')).toBeNull();
    expect((await post(`${url}/pay`, key, { cents: 100 })).headers.get('idempotent-replayed')).toBe('true');
    expect(runs).toBe(1);
  });

  it("a route's own 404 is stored as any answer", async () => {
    let runs = 0;
    const { url } = await start((app) => {
      const router = new Router();
      router.post('/orders/:id', (ctx) => {
        ctx.status = 404;
        ctx.body = { run: ++runs, error: 'no such order' };
      });
      app.use(idempotency({ store: createMemoryStore() }));
      app.use(router.routes());
    });
    expect((await post(`${url}/orders/7`, 'routed-404')).status).toBe(404);
    const again = await post(`${url}/orders/7`, 'routed-404');
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect(await again.json()).toEqual({ run: 1, error: 'no such order' });
  });
});

describe('koa binding: an answer no route gave, or a raw one', () => {
  // A handler that answers through ctx.res (a proxy: `ctx.respond = false`) ran, whatever it sent:
  // its 404 or 405 (the upstream's) is no answer "no route gave". Before, one that ended before
  // the handler returned freed the key (the retry ran the handler a second time), while the same
  // answer ending a moment after it returned was marked and never run again.
  it.each([
    ['ends before the handler returns', false],
    ['ends after the handler returned', true],
  ] as const)('ctx.respond = false answering 404 that %s: the retry does not run it again', async (_name, late) => {
    let runs = 0;
    const { url } = await start((app) => {
      app.use(idempotency({ store: createMemoryStore() }));
      app.use(async (ctx) => {
        runs++;
        ctx.respond = false;
        const answer = (): void => {
          ctx.res.statusCode = 404;
          ctx.res.setHeader('content-type', 'text/plain');
          ctx.res.end('upstream: no such order');
        };
        if (late) setImmediate(answer);
        else answer();
      });
    });
    const first = await post(`${url}/orders`, 'raw-404');
    expect(first.status).toBe(404);
    expect(await first.text()).toBe('upstream: no such order');
    const retry = await postUntil(410, `${url}/orders`, 'raw-404');
    expect(((await retry.json()) as { originalStatus: number }).originalStatus).toBe(404);
    expect(runs).toBe(1);
  });
});

// Was: @koa/bodyparser's `{}` for a request with no body was fingerprinted as `{}`, where Express
// and Fastify fingerprint no body: the same empty POST through another binding on the store got 422.
describe('koa binding: a request with no body', () => {
  it('is fingerprinted as no body, as the other bindings do, whatever the parser made of it', async () => {
    const store = createMemoryStore();
    const { url } = await start((app) => {
      app.use(idempotency({ store }));
      app.use((ctx) => {
        ctx.status = 201;
        ctx.body = { captured: true };
      });
    });
    const empty = (headers: Record<string, string>) => fetch(`${url}/payments/7/capture`, { method: 'POST', headers: { 'idempotency-key': 'capture-7', ...headers } });
    expect((await empty({})).status).toBe(201);
    expect((await empty({ 'content-length': '0' })).headers.get('idempotent-replayed')).toBe('true');
    const record = await store.get(scopedKey(undefined, 'capture-7'));
    expect(record?.fingerprint).toBe(defaultFingerprint({ method: 'POST', path: '/payments/7/capture', body: undefined }));
  });

  // A stream body that turned out empty goes out chunked with no bytes (`0`); its retry through a
  // client that buffers it sends `Content-Length: 0`. @koa/bodyparser makes `{}` of the first:
  // fingerprinted as a body, the retry got 422.
  it.each(['application/json', 'application/x-www-form-urlencoded'])('an empty chunked body (%s) and Content-Length: 0 are one request', async (type) => {
    let runs = 0;
    const { url } = await startKoa((app) => {
      app.use(idempotency({ store: createMemoryStore(), logger: false }));
      app.use((ctx) => {
        ctx.status = 201;
        ctx.body = { run: ++runs };
      });
    });
    const send = async (key: string, head: string, body = '') => {
      const socket = connect(Number(new URL(url).port), '127.0.0.1');
      socket.write(`POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: ${key}\r\n${head}Connection: close\r\n\r\n${body}`);
      let text = '';
      for await (const chunk of socket) text += (chunk as Buffer).toString('latin1');
      return { status: Number(text.split(' ')[1]), replayed: /\r\nidempotent-replayed: true\r\n/i.test(text) };
    };
    const chunked = `Content-Type: ${type}\r\nTransfer-Encoding: chunked\r\n`;
    expect(await send('empty-chunked', chunked, '0\r\n\r\n')).toEqual({ status: 201, replayed: false });
    expect(await send('empty-chunked', `Content-Type: ${type}\r\nContent-Length: 0\r\n`)).toEqual({ status: 201, replayed: true });
    expect(await send('empty-chunked', chunked, '0\r\n\r\n')).toEqual({ status: 201, replayed: true });
    // A chunked body with bytes is still a body: {} sent chunked is another request.
    expect(await send('empty-chunked', 'Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n', '2\r\n{}\r\n0\r\n\r\n')).toEqual({ status: 422, replayed: false });
    expect(runs).toBe(1);
  });
});

describe('koa binding: HTTP/2 request bodies', () => {
  // HTTP/2 has no Transfer-Encoding, and a client streaming its body (Node's http2 client, fetch
  // with a stream body) sends no Content-Length: the headers alone called such a body none, so a
  // second, different order under the same key got the first one's answer.
  it('a body sent without Content-Length is still a body: another body under the same key is 422, the same one replays', async () => {
    let runs = 0;
    const app = new Koa();
    app.silent = true;
    app.use(bodyParser());
    app.use(idempotency({ store: createMemoryStore(), logger: false }));
    app.use((ctx) => {
      ctx.status = 201;
      ctx.body = { run: ++runs, got: (ctx.request as { body?: unknown }).body };
    });
    const server = http2.createServer(app.callback()).listen(0, '127.0.0.1');
    await once(server, 'listening');
    const client = http2.connect(`http://127.0.0.1:${(server.address() as AddressInfo).port}`);
    try {
      const send = async (key: string, body: string, length?: number, endStream = false) => {
        const headers: http2.OutgoingHttpHeaders = { ':method': 'POST', ':path': '/orders', 'idempotency-key': key, 'content-type': 'application/json' };
        if (length !== undefined) headers['content-length'] = String(length);
        const req = client.request(headers, { endStream });
        if (!endStream) req.end(body);
        const [response] = (await once(req, 'response')) as [http2.IncomingHttpHeaders];
        let text = '';
        req.setEncoding('utf8');
        for await (const chunk of req) text += chunk as string;
        return { status: response[':status'], replayed: response['idempotent-replayed'] === 'true', text };
      };
      const first = await send('h2-order', '{"amount":1}');
      expect(first).toMatchObject({ status: 201, replayed: false });
      expect(JSON.parse(first.text)).toEqual({ run: 1, got: { amount: 1 } });
      // Before, 201 with the first order's answer, marked as a replay.
      expect(await send('h2-order', '{"amount":1000}')).toMatchObject({ status: 422, replayed: false });
      expect(await send('h2-order', '{"amount":1}')).toMatchObject({ status: 201, replayed: true });
      // A stream that turned out empty (an empty DATA frame) and an empty POST are one request.
      expect(await send('h2-empty', '')).toMatchObject({ status: 201, replayed: false });
      expect(await send('h2-empty', '', 0, true)).toMatchObject({ status: 201, replayed: true });
      expect(await send('h2-empty', '{"amount":1}')).toMatchObject({ status: 422, replayed: false });
      expect(runs).toBe(2);
    } finally {
      client.close();
      server.close();
    }
  });

  // Node's http2 client (and others) may send `content-length: 0` and then end the stream with an
  // empty DATA frame instead of on HEADERS: the length says no body, as it does on HTTP/1.1. No
  // parser reads such a request before idempotency() (none mounted: a webhook reading its raw
  // body itself), so it was taken for an unread body and refused 415, while its HTTP/1.1 twin ran.
  it('Content-Length: 0 with an empty DATA frame is no body, also when no parser read it', async () => {
    let runs = 0;
    const app = new Koa();
    app.silent = true;
    app.use(idempotency({ store: createMemoryStore(), logger: false }));
    app.use((ctx) => {
      ctx.status = 201;
      ctx.body = { run: ++runs };
    });
    const server = http2.createServer(app.callback()).listen(0, '127.0.0.1');
    await once(server, 'listening');
    const client = http2.connect(`http://127.0.0.1:${(server.address() as AddressInfo).port}`);
    try {
      const send = async () => {
        const req = client.request({ ':method': 'POST', ':path': '/hooks', 'idempotency-key': 'h2-zero', 'content-type': 'application/json', 'content-length': '0' });
        req.end();
        const [response] = (await once(req, 'response')) as [http2.IncomingHttpHeaders];
        req.resume();
        await once(req, 'end');
        return { status: response[':status'], replayed: response['idempotent-replayed'] === 'true' };
      };
      // Before, 415 "no body parser read" both times.
      expect(await send()).toEqual({ status: 201, replayed: false });
      expect(await send()).toEqual({ status: 201, replayed: true });
      expect(runs).toBe(1);
    } finally {
      client.close();
      server.close();
    }
  });

  // The key field of a JSON body no parser read (none mounted, or koa-body, which skips a body
  // without a length header): the same check told from the headers alone missed an HTTP/2 body
  // sent without Content-Length. The client was told 400 "no key" for the key it sent, where
  // HTTP/1.1 gets the 415 that names the missing parser; without `required` it passed unwarned.
  it('a key in an unread HTTP/2 body without Content-Length: 415 as on HTTP/1.1, and the warning without `required`', async () => {
    const warn = vi.fn();
    const app = new Koa();
    app.silent = true;
    const strict = idempotency({ store: createMemoryStore(), logger: { warn, error: vi.fn() } });
    const lenient = idempotency({ store: createMemoryStore(), required: false, logger: { warn, error: vi.fn() } });
    app.use((ctx, next) => (ctx.path === '/strict' ? strict(ctx, next) : lenient(ctx, next)));
    app.use((ctx) => void (ctx.status = 201));
    const server = http2.createServer(app.callback()).listen(0, '127.0.0.1');
    await once(server, 'listening');
    const client = http2.connect(`http://127.0.0.1:${(server.address() as AddressInfo).port}`);
    try {
      const send = async (path: string) => {
        const req = client.request({ ':method': 'POST', ':path': path, 'content-type': 'application/json' });
        req.end('{"idempotencyKey":"h2-body-key","amount":1}');
        const [response] = (await once(req, 'response')) as [http2.IncomingHttpHeaders];
        let text = '';
        req.setEncoding('utf8');
        for await (const chunk of req) text += chunk as string;
        return { status: response[':status'], text };
      };
      const strictAnswer = await send('/strict');
      // Before, 400 key-missing.
      expect(strictAnswer.status).toBe(415);
      expect(strictAnswer.text).toContain('no body parser read');
      warn.mockClear();
      expect((await send('/lenient')).status).toBe(201);
      // Before, no warning: the key in the body went unseen, and its retries ran again unannounced.
      expect(warn).toHaveBeenCalledWith(expect.stringContaining('went through with its body unread'));
    } finally {
      client.close();
      server.close();
    }
  });
});
