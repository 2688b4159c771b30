import { randomUUID } from 'node:crypto';
import { tmpdir } from 'node:os';
import { EventEmitter, once } from 'node:events';
import { connect, type AddressInfo } from 'node:net';
import { createServer, IncomingMessage } from 'node:http';
import { fileURLToPath } from 'node:url';
import { Readable } from 'node:stream';
import { ConfigurationError, createMemoryStore, scopedKey, type IdempotencyContext, type IdempotencyStore, type StoreTransaction, type TransactionalStore } from '@idemkit/core';
import compression from 'compression';
import timeout from 'connect-timeout';
import cookieSession from 'cookie-session';
import session from 'express-session';
import fileUpload from 'express-fileupload';
import multer from 'multer';
import express, { type ErrorRequestHandler, type Express, type NextFunction, type Request, type RequestHandler, type Response } from 'express';
import express4 from 'express4';
import { describe, expect, it, onTestFinished, vi } from 'vitest';
import { idempotency, idempotencyErrorHandler, type ExpressIdempotencyOptions } from '../src/index.js';
import { serving } from './app.js';
import { SlowBeginStore } from '@idemkit/http-suite';

const serve = serving();

interface Fetched {
  status: number;
  headers: Headers;
  body: Uint8Array;
}

async function post(url: string, key: string | undefined, init: RequestInit = {}): Promise<Fetched> {
  const headers = new Headers(init.headers);
  if (key !== undefined) headers.set('idempotency-key', key);
  const res = await fetch(url, { method: 'POST', ...init, headers, redirect: 'manual' });
  return { status: res.status, headers: res.headers, body: new Uint8Array(await res.arrayBuffer()) };
}

/** POST with `key` again until the answer has `status` (a lease running out, a late answer stored), within 5 s: that answer. */
function postUntil(status: number, url: string, key: string): Promise<Fetched> {
  return vi.waitFor(
    async () => {
      const reply = await post(url, key);
      expect(reply.status).toBe(status);
      return reply;
    },
    { timeout: 5_000, interval: 100 },
  );
}

/** Everything the server sent on one connection for `requests` (raw HTTP), until it closed. */
function rawExchange(url: string, requests: string): Promise<string> {
  const { port } = new URL(url);
  return new Promise((resolve) => {
    let out = '';
    const socket = connect(Number(port), '127.0.0.1', () => void socket.write(requests));
    socket.on('data', (d: Buffer) => (out += d.toString('latin1')));
    socket.on('error', () => undefined);
    socket.on('close', () => resolve(out));
  });
}

/**
 * A server that reads each request's JSON body itself and hands the app the request object
 * `make` builds from it, as a serverless platform's bridge does. Its URL.
 */
async function servePlatform(app: Express, make: (req: IncomingMessage, body: unknown) => object): Promise<string> {
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => app(make(req, JSON.parse(Buffer.concat(chunks).toString()) as unknown) as Request, res as Response));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  onTestFinished(() => void server.close());
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

/** A keyed POST with no body, then (pipelined behind it) `then`. */
/** Errors no one handled while the test runs (unhandled rejections, and the other events asked for). */
function unhandledErrors(events: ReadonlyArray<'unhandledRejection' | 'uncaughtException'> = ['unhandledRejection']): unknown[] {
  const seen: unknown[] = [];
  const record = (reason: unknown): void => void seen.push(reason);
  for (const event of events) process.on(event, record);
  onTestFinished(() => {
    for (const event of events) process.off(event, record);
  });
  return seen;
}
const keyedPost = (path: string, then = ''): string => `POST ${path} HTTP/1.1\r\nHost: x\r\nIdempotency-Key: ${randomUUID()}\r\nContent-Length: 0\r\n\r\n${then}`;
const NEXT_GET = 'GET /next HTTP/1.1\r\nHost: x\r\n\r\n';

/** Every header the client saw, minus those that differ per response by design. */
function comparable(headers: Headers): Array<[string, string]> {
  // content-length: a replay always carries it (recomputed), even when the original was chunked.
  const skip = new Set(['date', 'connection', 'keep-alive', 'idempotent-replayed', 'transfer-encoding', 'content-length']);
  return [...headers].filter(([name]) => !skip.has(name));
}

function appWith(options: Partial<ExpressIdempotencyOptions> = {}): { app: Express; runs: () => number; store: ReturnType<typeof createMemoryStore> } {
  const store = createMemoryStore();
  const app = express();
  app.use(express.json());
  app.use(idempotency({ store, logger: false, ...options }));
  let runs = 0;
  app.use((_req, _res, next) => {
    runs++;
    next();
  });
  return { app, runs: () => runs, store };
}

type Responder = (req: Request, res: Response) => void;

/** Each way an Express handler can answer, including Node's raw API with every argument shape. */
const RESPONDERS: Record<string, Responder> = {
  'res.json': (_req, res) => void res.status(201).json({ ok: true, list: [1, 2] }),
  'res.send(string)': (_req, res) => void res.send('<p>hello ✓</p>'),
  'res.send(Buffer)': (_req, res) => void res.send(Buffer.from([0, 1, 2, 254, 255])),
  'res.end(string, encoding, callback)': (_req, res) => {
    res.setHeader('content-type', 'text/plain; charset=latin1');
    res.end('caf\u00e9', 'latin1', () => undefined);
  },
  'res.end(callback)': (_req, res) => {
    res.statusCode = 204;
    res.end(() => undefined);
  },
  'res.end(Uint8Array)': (_req, res) => void res.end(new Uint8Array([9, 8, 7])),
  'res.writeHead(status, headers object) + end': (_req, res) => {
    res.writeHead(202, { 'x-from-write-head': 'object', 'content-type': 'text/plain' });
    res.end('accepted');
  },
  'res.writeHead(status, reason, flat header array) + end': (_req, res) => {
    res.writeHead(201, 'Made', ['set-cookie', 'a=1', 'set-cookie', 'b=2', 'x-raw', 'yes']);
    res.end();
  },
  'res.redirect': (_req, res) => res.redirect(303, '/elsewhere'),
  'res.sendStatus': (_req, res) => void res.sendStatus(202),
};

describe('express binding: every response path is captured and replayed exactly', () => {
  for (const [name, respond] of Object.entries(RESPONDERS)) {
    it(name, async () => {
      const { app, runs } = appWith();
      app.post('/r', (req, res) => respond(req, res));
      const url = await serve(app);
      const key = randomUUID();
      const first = await post(`${url}/r`, key);
      const replay = await post(`${url}/r`, key);
      expect(runs()).toBe(1);
      expect(first.headers.get('idempotent-replayed')).toBeNull();
      expect(replay.headers.get('idempotent-replayed')).toBe('true');
      expect(replay.status).toBe(first.status);
      expect(replay.body).toEqual(first.body);
      expect(comparable(replay.headers)).toEqual(comparable(first.headers));
      // Recomputed from the stored body; a 204 has none (RFC 9110 §8.6), like its original.
      expect(replay.headers.get('content-length')).toBe(replay.status === 204 ? null : String(replay.body.byteLength));
    });
  }

  it('req and res keep their own properties as they were (names, order, attributes), on a run, a replay and a problem', async () => {
    // idempotency() switches both objects to dictionary properties for speed (see
    // toDictionaryProperties): nothing of that may show, on a run, a replay or a problem.
    type Own = string[];
    const own = (o: object): Own =>
      Reflect.ownKeys(o).map((k) => {
        const d = Reflect.getOwnPropertyDescriptor(o, k)!;
        return `${String(k)} ${'value' in d ? `data ${String(d.writable)}` : 'accessor'} ${String(d.enumerable)} ${String(d.configurable)}`;
      });
    const seen: Array<{ req: [Own, Own]; res: [Own, Own] }> = [];
    const store = createMemoryStore();
    const app = express();
    app.use(express.json());
    app.use((req, res, next) => {
      const before = { req: own(req), res: own(res) };
      res.on('finish', () => seen.push({ req: [before.req, own(req)], res: [before.res, own(res)] }));
      next();
    });
    app.use(idempotency({ store, logger: false }));
    app.post('/orders', (_req, res) => void res.status(201).json({ ok: true }));
    const url = await serve(app);
    const key = randomUUID();
    const send = (body: string): Promise<Fetched> => post(`${url}/orders`, key, { headers: { 'content-type': 'application/json' }, body });
    expect((await send('{"a":1}')).status).toBe(201);
    expect((await send('{"a":1}')).headers.get('idempotent-replayed')).toBe('true');
    expect((await send('{"a":2}')).status).toBe(422);
    await vi.waitFor(() => expect(seen).toHaveLength(3));
    const [run] = seen;
    expect(run!.req[1]).toContain('idempotency data true true true');
    for (const { req, res } of seen) {
      for (const [before, after] of [req, res]) {
        // What was there stays, in its order, with its attributes (what is added, the statusCode
        // an answer sets or the patches of a run, comes after it) ...
        expect(after.filter((k) => before.includes(k))).toEqual(before);
        // ... and nothing of idemkit's stays behind.
        expect(after.filter((k) => k.includes('idemkit'))).toEqual([]);
      }
    }
  });

  it('res.end(bytes) on a 204 or 304 is stored without the bytes Node drops, so maxBodyBytes does not make it a 410', async () => {
    const { app, runs, store } = appWith({ maxBodyBytes: 4 });
    app.post('/r/:status', (req, res) => {
      res.statusCode = Number(req.params['status']);
      res.end('0123456789');
    });
    const url = await serve(app);
    for (const status of [204, 304]) {
      const key = randomUUID();
      const first = await post(`${url}/r/${status}`, key);
      const replay = await post(`${url}/r/${status}`, key);
      expect(first.status).toBe(status);
      // Before: the dropped bytes were stored, so the retry got 410 too-large (Koa and Fastify: the replay).
      expect(replay.status).toBe(status);
      expect(replay.headers.get('idempotent-replayed')).toBe('true');
      expect(replay.body.byteLength).toBe(0);
      expect((await store.get(scopedKey(undefined, key)))?.response?.body.byteLength).toBe(0);
    }
    expect(runs()).toBe(2);
  });

  it('a 204 or 304 with a Content-Length the handler set replays with it, as Node sent it the first time', async () => {
    const { app, runs } = appWith();
    app.post('/set/:status', (req, res) => {
      res.statusCode = Number(req.params['status']);
      res.setHeader('Content-Length', '5');
      res.setHeader('x-a', 'b');
      res.end();
    });
    app.post('/head/:status', (req, res) => {
      res.writeHead(Number(req.params['status']), { 'Content-Length': '123', 'x-a': 'b' });
      res.end();
    });
    const url = await serve(app);
    for (const [path, length] of [['set', '5'], ['head', '123']] as const) {
      for (const status of [204, 304]) {
        const key = randomUUID();
        const first = await post(`${url}/${path}/${status}`, key);
        const replay = await post(`${url}/${path}/${status}`, key);
        // Node sends the handler's Content-Length with a 204 or 304 (and no body).
        expect([path, first.status, first.headers.get('content-length')]).toEqual([path, status, length]);
        expect([path, replay.status, replay.headers.get('idempotent-replayed')]).toEqual([path, status, 'true']);
        // Before: never stored, and never recomputed for a 204 or 304, so the replay had none.
        expect([path, replay.headers.get('content-length')]).toEqual([path, length]);
        expect(comparable(replay.headers)).toEqual(comparable(first.headers));
        expect(replay.body.byteLength).toBe(0);
      }
    }
    expect(runs()).toBe(4);
  });

  it('a covered HEAD answered by res.redirect() or res.sendFile() replays the Content-Length the original had', async () => {
    const { app, runs } = appWith({ methods: ['POST', 'PATCH', 'HEAD'] });
    const file = fileURLToPath(import.meta.url);
    app.get('/redirect', (_req, res) => res.redirect(303, '/elsewhere'));
    app.get('/file', (_req, res) => res.sendFile(file));
    const url = await serve(app);
    for (const path of ['redirect', 'file']) {
      const key = randomUUID();
      const first = await post(`${url}/${path}`, key, { method: 'HEAD' });
      const replay = await post(`${url}/${path}`, key, { method: 'HEAD' });
      expect([path, first.status, replay.status]).toEqual([path, path === 'file' ? 200 : 303, path === 'file' ? 200 : 303]);
      expect(replay.headers.get('idempotent-replayed')).toBe('true');
      // Both set the length of a body they never give end() (a HEAD's): the replay recomputed
      // it from the empty stored body and said 0.
      expect(Number(first.headers.get('content-length'))).toBeGreaterThan(0);
      expect([path, replay.headers.get('content-length')]).toEqual([path, first.headers.get('content-length')]);
      expect(comparable(replay.headers)).toEqual(comparable(first.headers));
    }
    expect(runs()).toBe(2);
  });

  it("a HEAD's record replayed to another method (fingerprint: false) says the length of the body it sends, never the HEAD's", async () => {
    const { app, runs } = appWith({ methods: ['POST', 'HEAD'], fingerprint: false });
    const file = fileURLToPath(import.meta.url);
    app.get('/redirect', (_req, res) => res.redirect(303, '/elsewhere'));
    app.get('/file', (_req, res) => res.sendFile(file));
    app.get('/set', (_req, res) => {
      res.setHeader('Content-Length', '999');
      res.end();
    });
    const url = await serve(app);
    for (const path of ['redirect', 'file', 'set']) {
      const key = randomUUID();
      const first = await post(`${url}/${path}`, key, { method: 'HEAD' });
      expect(Number(first.headers.get('content-length'))).toBeGreaterThan(0);
      // The same key on a POST: the HEAD's record answers it, with the empty body stored for it.
      const raw = await rawExchange(url, `POST /${path} HTTP/1.1\r\nHost: x\r\nIdempotency-Key: ${key}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
      const [head = '', body = ''] = raw.split('\r\n\r\n');
      expect(head).toMatch(/^idempotent-replayed: true$/im);
      // Before: the HEAD's Content-Length with no bytes after it, so a client waited for them
      // until its timeout (or read the next answer on the connection as this one's body).
      expect([path, /^content-length: (\d+)$/im.exec(head)?.[1]]).toEqual([path, String(body.length)]);
    }
    expect(runs()).toBe(3);
  });

  it('a covered HEAD answered with no Content-Length (res.end()) replays with none, as it went out', async () => {
    const { app, runs } = appWith({ methods: ['POST', 'HEAD'] });
    app.head('/bare', (_req, res) => res.status(200).end());
    app.head('/sent', (_req, res) => res.send('abc'));
    const url = await serve(app);
    const exchange = async (path: string, key: string): Promise<string> =>
      (await rawExchange(url, `HEAD /${path} HTTP/1.1\r\nHost: x\r\nIdempotency-Key: ${key}\r\nConnection: close\r\n\r\n`)).split('\r\n\r\n')[0]!;
    const length = (head: string): string | undefined => /^content-length: (\d+)$/im.exec(head)?.[1];
    const key = randomUUID();
    const first = await exchange('bare', key);
    const replay = await exchange('bare', key);
    // Node sends a HEAD ended with no length none (nor Transfer-Encoding).
    expect(length(first)).toBeUndefined();
    expect(first).not.toMatch(/^transfer-encoding:/im);
    expect(replay).toMatch(/^idempotent-replayed: true$/im);
    // Before: `Content-Length: 0`, the length of the empty stored body, not the answer's.
    expect(length(replay)).toBeUndefined();
    expect(replay).not.toMatch(/^transfer-encoding:/im);
    // One res.send() sized keeps its length.
    const sentKey = randomUUID();
    expect(length(await exchange('sent', sentKey))).toBe('3');
    expect(length(await exchange('sent', sentKey))).toBe('3');
    expect(runs()).toBe(2);
  });

  it('res.write() or a pipe on a 204 or 304 (Node drops the bytes) is stored as the empty answer that went out, not marked 410', async () => {
    const { app, runs } = appWith();
    app.post('/w/:status', (req, res) => {
      res.statusCode = Number(req.params['status']);
      res.setHeader('x-a', 'b');
      res.write('dropped');
      res.end();
    });
    app.post('/head/:status', (req, res) => {
      res.writeHead(Number(req.params['status']), { 'x-a': 'b' });
      res.write('dropped');
      res.end();
    });
    app.post('/pipe/:status', (req, res) => {
      res.status(Number(req.params['status'])).set('x-a', 'b');
      Readable.from(['dropped']).pipe(res);
    });
    const url = await serve(app);
    for (const path of ['w', 'head', 'pipe']) {
      for (const status of [204, 304]) {
        const key = randomUUID();
        const first = await post(`${url}/${path}/${status}`, key);
        const replay = await post(`${url}/${path}/${status}`, key);
        expect([path, first.status]).toEqual([path, status]);
        // Before: taken for a streamed answer, so the retry got 410 not-bufferable (Koa: the replay).
        expect([path, replay.status]).toEqual([path, status]);
        expect(replay.headers.get('idempotent-replayed')).toBe('true');
        expect(replay.headers.get('x-a')).toBe('b');
        expect(replay.body.byteLength).toBe(0);
      }
    }
    expect(runs()).toBe(6);
  });

  it('a write on a 204 and then a throw is a throw after writeHead(): the connection is cut as without idempotency(), and the retry runs', async () => {
    const store = createMemoryStore();
    const app = express();
    app.use(express.json());
    app.use(idempotency({ store, logger: false }));
    let runs = 0;
    app.post('/w', (_req, res) => {
      runs++;
      res.status(204);
      res.write('dropped');
      throw new Error('boom');
    });
    app.use(idempotencyErrorHandler());
    const url = await serve(app);
    const key = randomUUID();
    for (let i = 0; i < 2; i++) await expect(post(`${url}/w`, key)).rejects.toThrow();
    expect(runs).toBe(2);
  });

  it('res.write() streams: chunks pass through, the retry gets 410 and the handler is not re-run', async () => {
    const { app, runs } = appWith();
    app.post('/sse', (_req, res) => {
      res.setHeader('content-type', 'text/event-stream');
      res.flushHeaders();
      res.write('data: 1\n\n');
      res.write(Buffer.from('data: 2\n\n'), () => undefined);
      res.end('data: end\n\n', 'utf8');
    });
    const url = await serve(app);
    const key = randomUUID();
    const first = await post(`${url}/sse`, key);
    expect(new TextDecoder().decode(first.body)).toBe('data: 1\n\ndata: 2\n\ndata: end\n\n');
    const retry = await post(`${url}/sse`, key);
    expect(retry.status).toBe(410);
    expect(JSON.parse(new TextDecoder().decode(retry.body))).toMatchObject({ code: 'ERR_IDEMKIT_RESPONSE_NOT_REPLAYABLE', reason: 'not-bufferable' });
    expect(runs()).toBe(1);
  });
});

describe('express binding: mounted under a path', () => {
  it('the fingerprint has the whole path: one key sent to /v1/orders, then /v2/orders (the same path inside each router), is a 422, not the other route\'s answer', async () => {
    const store = createMemoryStore();
    const app = express();
    app.use(express.json());
    let runs = 0;
    for (const version of ['v1', 'v2']) {
      const router = express.Router();
      // Inside each router, req.url is '/orders' for both: only req.originalUrl tells them apart.
      router.use(idempotency({ store, logger: false }));
      router.post('/orders', (_req, res) => void res.status(201).json({ version, run: ++runs }));
      app.use(`/${version}`, router);
    }
    const url = await serve(app);
    const key = randomUUID();
    const init = { headers: { 'content-type': 'application/json' }, body: '{"sku":"A1"}' };
    const first = await post(`${url}/v1/orders`, key, init);
    expect(first.status).toBe(201);
    const other = await post(`${url}/v2/orders`, key, init);
    expect(other.status).toBe(422);
    expect(JSON.parse(new TextDecoder().decode(other.body))).toMatchObject({ code: 'ERR_IDEMKIT_FINGERPRINT_MISMATCH' });
    const again = await post(`${url}/v1/orders`, key, init);
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect(new TextDecoder().decode(again.body)).toBe(new TextDecoder().decode(first.body));
    expect(runs).toBe(1);
  });
});

describe('express binding: headers middleware set before the key was claimed', () => {
  it('a list the handler appended to (Link) replays with every value, the middleware\'s too', async () => {
    const app = express();
    app.use((_req, res, next) => {
      res.setHeader('link', '</app.css>; rel=preload');
      next();
    });
    app.use(idempotency({ store: createMemoryStore(), logger: false }));
    app.post('/r', (_req, res) => void res.append('link', '</order.js>; rel=preload').status(201).send('ok'));
    const url = await serve(app);
    const key = randomUUID();
    const first = await post(`${url}/r`, key);
    const replay = await post(`${url}/r`, key);
    expect(first.headers.get('link')).toBe('</app.css>; rel=preload, </order.js>; rel=preload');
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    // Before: only the handler's value came back.
    expect(replay.headers.get('link')).toBe(first.headers.get('link'));
  });
});

describe('express binding: cookies session middleware sets as the head is written', () => {
  /** idempotency(), then the login route these tests post to: it saves the user in the session. */
  function withLogin(app: Express): void {
    app.use(idempotency({ store: createMemoryStore(), logger: false }));
    app.post('/login', (req, res) => {
      (req.session as unknown as Record<string, unknown>)['user'] = 'alice';
      res.status(201).json({ user: 'alice' });
    });
  }

  // express-session and cookie-session set their cookie from an on-headers listener, which ran
  // only once the answer was stored: the replay of a login lacked the session it created.
  const logins: Record<string, (app: Express) => void> = {
    'express-session': (app) => void app.use(session({ secret: 's', resave: false, saveUninitialized: false })),
    'cookie-session': (app) => void app.use(cookieSession({ name: 'sess', keys: ['k'] })),
  };
  for (const [name, mount] of Object.entries(logins)) {
    it(`${name}: a retried login's replay carries the session cookie the first answer set, which logs the client in`, async () => {
      const build = (withIdempotency: boolean): Express => {
        const app = express();
        app.use(compression({ threshold: 0 }));
        mount(app);
        app.use(express.json());
        if (withIdempotency) app.use(idempotency({ store: createMemoryStore(), logger: false }));
        app.post('/login', (req, res) => {
          (req.session as unknown as Record<string, unknown>)['user'] = 'alice';
          res.status(201).json({ user: 'alice' });
        });
        app.get('/me', (req, res) => void res.json({ user: (req.session as unknown as Record<string, unknown> | null)?.['user'] ?? null }));
        return app;
      };
      const cookiesOf = (r: Fetched): string[] => r.headers.getSetCookie().map((c) => c.split(';')[0]!);
      const login = (url: string, key: string): Promise<Fetched> => post(`${url}/login`, key, { headers: { 'content-type': 'application/json', 'accept-encoding': 'gzip' }, body: '{}' });
      const plain = await login(await serve(build(false)), randomUUID());
      const url = await serve(build(true));
      const key = randomUUID();
      const first = await login(url, key);
      const replay = await login(url, key);
      // The first answer is what the app gives without idempotency().
      expect(first.status).toBe(plain.status);
      expect(cookiesOf(first).map((c) => c.split('=')[0])).toEqual(cookiesOf(plain).map((c) => c.split('=')[0]));
      expect(first.headers.get('content-encoding')).toBe('gzip');
      expect(replay.headers.get('idempotent-replayed')).toBe('true');
      expect(replay.body).toEqual(first.body);
      expect(replay.headers.get('content-encoding')).toBe('gzip');
      expect(cookiesOf(replay)).toEqual(cookiesOf(first));
      const me = await fetch(`${url}/me`, { headers: { cookie: cookiesOf(replay).join('; ') } });
      expect(await me.json()).toEqual({ user: 'alice' });
    });
  }

  it("express-session's default saveUninitialized: the replay's stored session cookie comes after the new empty one it gives a cookieless retry", async () => {
    const app = express();
    app.use(session({ secret: 's', resave: false, saveUninitialized: true }));
    withLogin(app);
    app.get('/me', (req, res) => void res.json({ user: (req.session as unknown as Record<string, unknown>)['user'] ?? null }));
    const url = await serve(app);
    const key = randomUUID();
    const first = await post(`${url}/login`, key);
    const replay = await post(`${url}/login`, key);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    // A browser keeps the last cookie of a name.
    const jar = new Map(replay.headers.getSetCookie().map((c) => c.split(';')[0]!.split('=') as [string, string]));
    expect(jar.get('connect.sid')).toBe(first.headers.getSetCookie()[0]!.split(';')[0]!.split('=')[1]);
    const me = await fetch(`${url}/me`, { headers: { cookie: [...jar].map(([k, v]) => `${k}=${v}`).join('; ') } });
    expect(await me.json()).toEqual({ user: 'alice' });
  });

  it('a replay carries each cookie once, as the first answer did: not the cookieless retry\'s new empty session beside the stored one', async () => {
    const app = express();
    app.use(session({ secret: 's', resave: false, saveUninitialized: true, rolling: true }));
    app.use((_req, res, next) => void (res.cookie('theme', 'dark', { path: '/' }), res.cookie('theme', 'x', { path: '/admin' }), next()));
    withLogin(app);
    const url = await serve(app);
    const key = randomUUID();
    const first = await post(`${url}/login`, key);
    const replay = await post(`${url}/login`, key);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    const names = (r: Fetched): string[] => r.headers.getSetCookie().map((c) => `${c.split('=')[0]!} ${/Path=([^;]*)/.exec(c)?.[1] ?? ''}`);
    expect(names(first)).toEqual(['theme /', 'theme /admin', 'connect.sid /']);
    // A cookie is its name, Domain and Path: the one at /admin is another cookie and stays.
    expect(names(replay).toSorted()).toEqual(names(first).toSorted());
    expect(replay.headers.getSetCookie().find((c) => c.startsWith('connect.sid='))).toBe(first.headers.getSetCookie().find((c) => c.startsWith('connect.sid=')));
  });

  it('express-session mounted after idempotency() streams every answer that saves the session (410 to its retry): said once in the log', async () => {
    const warn = vi.fn();
    const { app, runs } = appWith({ logger: { warn, error: vi.fn() } });
    app.use(session({ secret: 's', resave: false, saveUninitialized: false }));
    app.post('/login', (req, res) => {
      (req.session as unknown as Record<string, unknown>)['user'] = 'alice';
      res.status(201).json({ user: 'alice' });
    });
    const url = await serve(app);
    const key = randomUUID();
    expect((await post(`${url}/login`, key)).status).toBe(201);
    expect((await post(`${url}/login`, key)).status).toBe(410);
    expect((await post(`${url}/login`, randomUUID())).status).toBe(201);
    expect(runs()).toBe(2);
    expect(warn).toHaveBeenCalledTimes(1);
    expect(String(warn.mock.calls[0]?.[0])).toMatch(/express-session .*mount such middleware before idempotency\(\)/);
  });

  it('a head written with res.writeHead() under compression(): the replay is as readable as the first answer (no Content-Encoding over raw bytes)', async () => {
    const app = express();
    app.use(compression({ threshold: 0 }));
    app.use(idempotency({ store: createMemoryStore(), logger: false }));
    app.post('/made', (_req, res) => {
      res.writeHead(201, { 'content-type': 'text/plain' });
      res.end('made');
    });
    const url = await serve(app);
    const key = randomUUID();
    const send = (): Promise<Fetched> => post(`${url}/made`, key, { headers: { 'accept-encoding': 'gzip' } });
    const first = await send();
    expect(first.headers.get('content-encoding')).toBe('gzip');
    expect(new TextDecoder().decode(first.body)).toBe('made');
    // Before, the stored head kept the first answer's Content-Encoding: gzip, and fetch failed to
    // decode the replay's raw bytes.
    const replay = await send();
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(new TextDecoder().decode(replay.body)).toBe('made');
    expect(replay.headers.get('content-encoding')).toBe('gzip');
  });

  it('a res.writeHead wrapper that runs at every call (not on-headers\' once) runs once for the first answer and once for its replay, as without idempotency()', async () => {
    let calls = 0;
    const app = express();
    app.use(cookieSession({ name: 'sess', keys: ['k'] }));
    app.use((_req, res, next) => {
      const wrapped = res.writeHead;
      res.writeHead = function writeHead(this: Response, ...args: unknown[]) {
        calls++;
        this.appendHeader('server-timing', 'app;dur=1');
        return Reflect.apply(wrapped, this, args) as Response;
      } as Response['writeHead'];
      next();
    });
    withLogin(app);
    const url = await serve(app);
    const key = randomUUID();
    const first = await post(`${url}/login`, key);
    expect(calls).toBe(1);
    expect(first.headers.get('server-timing')).toBe('app;dur=1');
    const replay = await post(`${url}/login`, key);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(calls).toBe(2);
    expect(replay.headers.get('server-timing')).toBe('app;dur=1');
    expect(replay.headers.getSetCookie()).toEqual(first.headers.getSetCookie());
  });

  it('a handler that streams with pipe() under express-session mounted after idempotency() is no sign of that session: nothing in the log', async () => {
    const warn = vi.fn();
    const { app } = appWith({ logger: { warn, error: vi.fn() } });
    app.use(session({ secret: 's', resave: false, saveUninitialized: false }));
    app.post('/export', (_req, res) => {
      res.setHeader('content-type', 'text/plain');
      Readable.from(['a', 'b', 'c']).pipe(res);
    });
    const url = await serve(app);
    const key = randomUUID();
    const first = await post(`${url}/export`, key);
    expect(new TextDecoder().decode(first.body)).toBe('abc');
    expect((await post(`${url}/export`, key)).status).toBe(410);
    // Before, it said express-session streamed the answer and to mount it before idempotency().
    expect(warn).not.toHaveBeenCalled();
  });

  it('a handler that writes its own head with writeHead() and then streams (SSE) under express-session mounted after idempotency(): nothing in the log', async () => {
    const warn = vi.fn();
    const { app } = appWith({ logger: { warn, error: vi.fn() } });
    app.use(session({ secret: 's', resave: false, saveUninitialized: false }));
    app.post('/events', (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write('data: a\n\n');
      res.end('data: b\n\n');
    });
    const url = await serve(app);
    const first = await post(`${url}/events`, randomUUID());
    expect(new TextDecoder().decode(first.body)).toBe('data: a\n\ndata: b\n\n');
    // Its head was written before its first write, as express-session's end() writes one: taken for that.
    expect(warn).not.toHaveBeenCalled();
  });

  it("running those listeners early changes nothing of the first answer: compression() before it still leaves a raw end() under its threshold alone", async () => {
    const build = (withIdempotency: boolean): Express => {
      const app = express();
      app.use(compression());
      app.use(session({ secret: 's', resave: false, saveUninitialized: false }));
      if (withIdempotency) app.use(idempotency({ store: createMemoryStore(), logger: false }));
      app.post('/raw', (_req, res) => {
        res.setHeader('content-type', 'text/plain');
        res.end('small body');
      });
      return app;
    };
    const send = async (url: string): Promise<Fetched> => post(`${url}/raw`, randomUUID(), { headers: { 'accept-encoding': 'gzip' } });
    const plain = await send(await serve(build(false)));
    const first = await send(await serve(build(true)));
    expect(plain.headers.get('content-encoding')).toBeNull();
    // Before, compression() saw no length from here and gzipped the 10 bytes.
    expect(first.headers.get('content-encoding')).toBeNull();
    expect(comparable(first.headers)).toEqual(comparable(plain.headers));
    expect(new TextDecoder().decode(first.body)).toBe('small body');
  });
});

describe('express binding: errors', () => {
  it('an onProblem that is no function is refused at once (before, every problem answer became a 500)', () => {
    expect(() => idempotency({ store: createMemoryStore(), onProblem: 5 as never })).toThrow(ConfigurationError);
    expect(() => idempotency({ store: createMemoryStore(), onProblem: 5 as never })).toThrow('`onProblem` must be a function.');
  });

  const toJson: ErrorRequestHandler = (err: { code?: string; status?: number }, _req, res, _next) => {
    res.status(err.status ?? 500).json({ code: err.code ?? 'internal' });
  };

  it('an error handler that ends with a status Node refuses (res.statusCode = err.statusCode, undefined): a 500 as without idemkit, never a crash, and the retry runs', async () => {
    const unhandled = unhandledErrors(['unhandledRejection', 'uncaughtException']);
    const { app, runs } = appWith();
    app.post('/pay', () => {
      throw new Error('card declined');
    });
    app.post('/thousand', (_req, res) => {
      res.statusCode = 1000;
      res.end('x');
    });
    app.use(((err: { statusCode?: number }, _req, res, _next) => {
      res.statusCode = err.statusCode as number; // undefined: Node's writeHead throws
      res.setHeader('content-type', 'application/json');
      res.end('{"error":"declined"}');
    }) as ErrorRequestHandler);
    const url = await serve(app);
    const key = randomUUID();
    for (const path of ['/pay', '/thousand']) {
      const first = await post(`${url}${path}`, key + path, { body: '{}', headers: { 'content-type': 'application/json' } });
      expect(first.status).toBe(500);
      const retry = await post(`${url}${path}`, key + path, { body: '{}', headers: { 'content-type': 'application/json' } });
      expect(retry.status).toBe(500);
      expect(retry.headers.get('idempotent-replayed')).toBeNull();
    }
    expect(runs()).toBe(4);
    expect(unhandled).toEqual([]);
  });

  it('a streamed answer ended with a chunk Node refuses (res.end(42)): the response is destroyed, never an unhandled rejection', async () => {
    const unhandled = unhandledErrors(['unhandledRejection', 'uncaughtException']);
    const { app } = appWith();
    app.post('/stream', (_req, res) => {
      res.write('a');
      try {
        (res.end as (chunk: unknown) => void)(42);
      } catch {
        // Node throws here without idemkit; with it the refusal comes once the stream is released.
      }
    });
    app.post('/ok', (_req, res) => void res.status(201).send('fine'));
    const url = await serve(app);
    await expect(post(`${url}/stream`, randomUUID())).rejects.toThrow();
    // The server lives on.
    expect((await post(`${url}/ok`, randomUUID())).status).toBe(201);
    expect(unhandled).toEqual([]);
  });

  it('a write Node refuses (res.write(42), or a status it refuses) throws as without idemkit: the error handler answers a whole 500, and the retry runs', async () => {
    const { app, runs } = appWith();
    app.post('/chunk', (_req, res) => {
      (res.write as (chunk: unknown) => boolean)(42);
    });
    app.post('/status', (_req, res) => {
      res.statusCode = 1000;
      res.write('a');
    });
    app.post('/flush', (_req, res) => {
      res.statusCode = 1000;
      res.flushHeaders();
    });
    const url = await serve(app);
    for (const path of ['/chunk', '/status', '/flush']) {
      const key = randomUUID();
      // Before: the body of Express's 500 page went out with no status line or headers.
      const raw = await rawExchange(url, `POST ${path} HTTP/1.1\r\nHost: x\r\nIdempotency-Key: ${key}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
      expect(raw.startsWith('HTTP/1.1 500 ')).toBe(true);
      // Not stored (before: a 410 for good): the retry runs.
      expect((await post(`${url}${path}`, key)).status).toBe(500);
    }
    expect(runs()).toBe(6);
  });

  it('writeHead(201), then a status set too late: the 201 that went out is what is stored and replayed', async () => {
    const { app, runs } = appWith();
    app.post('/late', (_req, res) => {
      res.writeHead(201, { 'content-type': 'text/plain' });
      res.statusCode = 1000; // goes nowhere: the head holds 201
      res.end('made');
    });
    const url = await serve(app);
    const key = randomUUID();
    const first = await post(`${url}/late`, key);
    expect(first.status).toBe(201);
    const again = await post(`${url}/late`, key);
    // Before: 1000 was stored, not storable, so the key was freed and the handler ran again.
    expect(again.status).toBe(201);
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect(runs()).toBe(1);
  });

  it('writeHead(202), a status set too late, then a stream: settled by the 202 that went out (a 410 to retries), never run again', async () => {
    const { app, runs } = appWith();
    app.post('/late-stream', (_req, res) => {
      res.writeHead(202);
      res.statusCode = 500; // goes nowhere: the head holds 202
      res.write('a');
      res.end('b');
    });
    const url = await serve(app);
    const key = randomUUID();
    expect((await post(`${url}/late-stream`, key)).status).toBe(202);
    // Before: settled as a 500, not storable, so the key was freed and every retry ran it again.
    const again = await post(`${url}/late-stream`, key);
    expect(again.status).toBe(410);
    expect(runs()).toBe(1);
  });

  it('res.end(callback) after the answer finished gets Node\'s ERR_STREAM_ALREADY_FINISHED, as without idemkit', async () => {
    const { app } = appWith();
    const late = new Promise<unknown>((resolve) => {
      app.post('/after', (_req, res) => {
        res.status(201).end('once');
        res.once('finish', () => res.end((error?: unknown) => resolve(error)));
      });
    });
    const url = await serve(app);
    expect((await post(`${url}/after`, randomUUID())).status).toBe(201);
    expect(await late).toMatchObject({ code: 'ERR_STREAM_ALREADY_FINISHED' });
  });

  it('a second res.end(callback) while the first is stored gets its callback once the answer finished, as in Node', async () => {
    const { app } = appWith();
    const called = new Promise<unknown[]>((resolve) => {
      app.post('/twice', (_req, res) => {
        res.status(201).end('once');
        res.end((...args: unknown[]) => resolve(args));
      });
    });
    const url = await serve(app);
    expect((await post(`${url}/twice`, randomUUID())).status).toBe(201);
    expect(await called).toEqual([]);
  });

  it('a body without a body parser → next(ConfigurationError ERR_IDEMKIT_BODY_NOT_PARSED, status 415), handler not run', async () => {
    const app = express();
    app.use(idempotency({ store: createMemoryStore(), logger: false }));
    const handler = vi.fn((_req: Request, res: Response) => void res.sendStatus(201));
    app.post('/x', handler);
    app.use(toJson);
    const url = await serve(app);
    const reply = await post(`${url}/x`, randomUUID(), { body: JSON.stringify({ a: 1 }), headers: { 'content-type': 'application/json' } });
    // 415: also what a client gets for a content type no mounted parser reads (text/plain to express.json()).
    expect(reply.status).toBe(415);
    expect(JSON.parse(new TextDecoder().decode(reply.body))).toEqual({ code: 'ERR_IDEMKIT_BODY_NOT_PARSED' });
    expect(handler).not.toHaveBeenCalled();
    // No body at all needs no parser.
    expect((await post(`${url}/x`, randomUUID())).status).toBe(201);
  });

  it('a request without a key is never refused for its unparsed body: 400 for a missing key, or through with required: false', async () => {
    const xml = { body: '<order/>', headers: { 'content-type': 'application/xml' } };
    for (const required of [true, false]) {
      const warn = vi.fn();
      const app = express();
      app.use(express.json());
      app.use(idempotency({ store: createMemoryStore(), logger: { warn, error: vi.fn() }, required }));
      // A webhook that reads its raw body itself.
      app.post('/hook', (_req, res) => void res.sendStatus(204));
      app.use(toJson);
      const url = await serve(app);
      // Before, both were 415: the body check came before the key lookup.
      expect((await post(`${url}/hook`, undefined, xml)).status).toBe(required ? 400 : 204);
      expect((await post(`${url}/hook`, randomUUID(), xml)).status).toBe(415);
      // A JSON webhook (Stripe's) passes with required: false. With required: true its body may
      // hold the key itself (`idempotencyKey`): unread, it is refused rather than told "no key".
      expect((await post(`${url}/hook`, undefined, { body: '{"idempotencyKey":"k1"}', headers: { 'content-type': 'application/vnd.api+json' } })).status).toBe(required ? 415 : 204);
      if (!required) {
        // Passed through, but a key in that unread body would not be seen: said once.
        await post(`${url}/hook`, undefined, { body: '{"idempotencyKey":"k1"}', headers: { 'content-type': 'application/json' } });
        const bodyKeyWarnings = warn.mock.calls.filter(([message]) => String(message).includes('would not be seen'));
        expect(bodyKeyWarnings).toHaveLength(1);
      }
    }
  });

  it('a body no mounted parser read is logged once (an error handler that logs only 5xx would hide it)', async () => {
    const warn = vi.fn();
    const app = express();
    app.use(express.json());
    app.use(idempotency({ store: createMemoryStore(), logger: { warn, error: vi.fn() } }));
    app.post('/x', (_req, res) => void res.sendStatus(201));
    app.use(toJson);
    const url = await serve(app);
    for (let i = 0; i < 2; i++) {
      const reply = await post(`${url}/x`, randomUUID(), { body: 'plain words', headers: { 'content-type': 'text/plain' } });
      expect(reply.status).toBe(415);
    }
    expect(warn).toHaveBeenCalledTimes(1);
    expect(warn.mock.calls[0]?.[0]).toMatch(/content-type "text\/plain"\) that no body parser read/);
  });

  it('next(err) and a sync throw answered 500 by the error handler → key released, the retry runs again', async () => {
    const { app, runs } = appWith();
    app.post('/next-err', (_req, _res, next) => next(new Error('boom')));
    app.post('/sync-throw', () => {
      throw new Error('boom');
    });
    app.use(toJson);
    const url = await serve(app);
    for (const path of ['/next-err', '/sync-throw']) {
      const key = randomUUID();
      expect((await post(url + path, key)).status).toBe(500);
      expect((await post(url + path, key)).status).toBe(500);
    }
    expect(runs()).toBe(4);
  });

  it('documented: an error handler that answers a storable status (400) for a thrown error gets that answer stored', async () => {
    const { app, runs } = appWith();
    app.post('/invalid', (_req, _res, next) => next(Object.assign(new Error('bad input'), { status: 400, code: 'bad' })));
    app.use(toJson);
    const url = await serve(app);
    const key = randomUUID();
    expect((await post(`${url}/invalid`, key)).status).toBe(400);
    const retry = await post(`${url}/invalid`, key);
    expect(retry.status).toBe(400);
    expect(retry.headers.get('idempotent-replayed')).toBe('true');
    expect(runs()).toBe(1);
  });

  it('with idempotencyErrorHandler() mounted, a thrown error rendered as 400 releases the key: the retry runs again', async () => {
    const { app, runs } = appWith();
    app.post('/invalid', (_req, _res, next) => next(Object.assign(new Error('bad input'), { status: 400, code: 'bad' })));
    app.post('/throws', () => {
      throw Object.assign(new Error('bad input'), { status: 400, code: 'bad' });
    });
    app.use(idempotencyErrorHandler());
    app.use(toJson);
    const url = await serve(app);
    for (const path of ['/invalid', '/throws']) {
      const key = randomUUID();
      expect((await post(url + path, key)).status).toBe(400);
      const retry = await post(url + path, key);
      expect(retry.status).toBe(400);
      expect(retry.headers.get('idempotent-replayed')).toBeNull();
    }
    expect(runs()).toBe(4);
  });

  it.each([false, true])('with compression() after idempotency(), a throw after the answer neither runs it again nor answers for rolled-back work (error handler: %s)', async (withErrorHandler) => {
    // compression() sends the head from end() at once and the gzipped body a tick later; the throw
    // comes in between. Before, idempotencyErrorHandler() freed the key then: every retry charged again.
    const { app } = appWith();
    const router = express.Router();
    router.use(compression({ threshold: 0 }));
    let charges = 0;
    router.post('/payments', (_req, res) => {
      charges++;
      res.status(201).json({ id: `pay_${charges}` });
      throw new Error('audit log failed');
    });
    app.use('/v1', router);
    if (withErrorHandler) app.use(idempotencyErrorHandler());
    app.use(((_err, _req, res, next) => (res.headersSent ? next() : res.status(500).end())) as ErrorRequestHandler);
    const url = await serve(app);
    const key = randomUUID();
    const first = await post(`${url}/v1/payments`, key, { headers: { 'accept-encoding': 'gzip' } });
    expect(first.status).toBe(201);
    const retries: Fetched[] = [];
    for (let i = 0; i < 2; i++) retries.push(await post(`${url}/v1/payments`, key, { headers: { 'accept-encoding': 'gzip' } }));
    expect(charges).toBe(1);
    // A compressed answer streams, so it is never stored: its key answers 410 (mount compression before idempotency()).
    expect(retries.map((r) => r.status)).toEqual([410, 410]);
  });

  it('says once in the log when compression() after idempotency() makes answers unreplayable; compression before it is fine', async () => {
    const warn = vi.fn();
    const { app } = appWith({ logger: { warn, error: vi.fn() } });
    const router = express.Router();
    router.use(compression({ threshold: 0 }));
    router.post('/orders', (_req, res) => void res.status(201).json({ ok: true }));
    app.use('/v1', router);
    // A deliberate stream without Content-Encoding (SSE, a file): 410 on retry as documented, no warning.
    app.post('/stream', (_req, res) => {
      res.status(201).write('part one, ');
      res.end('part two');
    });
    const url = await serve(app);
    const gzip = { headers: { 'accept-encoding': 'gzip' } };
    const streamKey = randomUUID();
    expect((await post(`${url}/stream`, streamKey)).status).toBe(201);
    expect((await post(`${url}/stream`, streamKey)).status).toBe(410);
    expect(warn).not.toHaveBeenCalled();
    for (let i = 0; i < 2; i++) expect((await post(`${url}/v1/orders`, randomUUID(), gzip)).status).toBe(201);
    expect(warn).toHaveBeenCalledTimes(1);
    expect(String(warn.mock.calls[0]?.[0])).toMatch(/Content-Encoding: gzip went out as a stream.*mount it before idempotency\(\)/);

    // Mounted before: the uncompressed answer is stored, the replay is compressed again, nothing to warn about.
    const quiet = vi.fn();
    const before = express();
    before.use(compression({ threshold: 0 }));
    before.use(express.json());
    before.use(idempotency({ store: createMemoryStore(), logger: { warn: quiet, error: vi.fn() } }));
    before.post('/orders', (_req, res) => void res.status(201).json({ ok: true }));
    // A deliberate stream there is compressed too (compression's writeHead sets Content-Encoding
    // before the first write), yet it is the handler's own: no warning either.
    before.post('/events', (_req, res) => {
      res.writeHead(201, { 'content-type': 'text/plain' });
      res.write('x'.repeat(2048));
      res.end('y'.repeat(2048));
    });
    const beforeUrl = await serve(before);
    const key = randomUUID();
    expect((await post(`${beforeUrl}/orders`, key, gzip)).status).toBe(201);
    const replay = await post(`${beforeUrl}/orders`, key, gzip);
    expect([replay.status, replay.headers.get('idempotent-replayed'), replay.headers.get('content-encoding')]).toEqual([201, 'true', 'gzip']);
    const events = await post(`${beforeUrl}/events`, randomUUID(), gzip);
    expect([events.status, events.headers.get('content-encoding'), events.body.byteLength]).toEqual([201, 'gzip', 4096]);
    expect(quiet).not.toHaveBeenCalled();
  });

  it('a throwing scope() callback flows to the error handler, no lease taken', async () => {
    const { app, runs, store } = appWith({
      scope: () => {
        throw Object.assign(new Error('no tenant'), { status: 401, code: 'unauthenticated' });
      },
    });
    app.post('/x', (_req, res) => void res.sendStatus(201));
    app.use(toJson);
    const url = await serve(app);
    const reply = await post(`${url}/x`, randomUUID());
    expect(reply.status).toBe(401);
    expect(runs()).toBe(0);
    expect(store.size).toBe(0);
  });

  it('onProblem replaces the problem body', async () => {
    const { app } = appWith({ onProblem: (error, _req, res) => void res.status(error.status).json({ mine: error.code }) });
    app.post('/x', (_req, res) => void res.sendStatus(201));
    const url = await serve(app);
    const reply = await post(`${url}/x`, undefined);
    expect(reply.status).toBe(400);
    expect(JSON.parse(new TextDecoder().decode(reply.body))).toEqual({ mine: 'ERR_IDEMKIT_KEY_MISSING' });
  });

  it('onProblem that calls next() without an error gets the problem answer, never the handler (a second run on a 409)', async () => {
    const seen: number[] = [];
    let release = (): void => undefined;
    const { app, runs } = appWith({ onProblem: (error, _req, _res, next) => (seen.push(error.status), next()) });
    app.post('/x', async (_req, res) => {
      await new Promise<void>((resolve) => (release = resolve));
      res.status(201).json({ charged: true });
    });
    const url = await serve(app);
    const key = randomUUID();
    const first = post(`${url}/x`, key);
    await vi.waitFor(() => expect(runs()).toBe(1));
    const duplicate = await post(`${url}/x`, key);
    expect([duplicate.status, duplicate.headers.get('content-type')]).toEqual([409, 'application/problem+json']);
    const missing = await post(`${url}/x`, undefined);
    expect(missing.status).toBe(400);
    release();
    expect((await first).status).toBe(201);
    expect(runs()).toBe(1);
    expect(seen).toEqual([409, 400]);
  });

  it("onProblem's next(error) still reaches the error handlers", async () => {
    const { app } = appWith({ onProblem: (error, _req, _res, next) => next(error) });
    app.post('/x', (_req, res) => void res.sendStatus(201));
    app.use(((error: { status: number; code: string }, _req, res, _next) => void res.status(error.status).json({ handled: error.code })) as ErrorRequestHandler);
    const url = await serve(app);
    const reply = await post(`${url}/x`, undefined);
    expect(reply.status).toBe(400);
    expect(JSON.parse(new TextDecoder().decode(reply.body))).toEqual({ handled: 'ERR_IDEMKIT_KEY_MISSING' });
  });

  it('onProblem is not called for the stored 410 of a streamed answer: its retries replay it as stored', async () => {
    const problems: number[] = [];
    const { app } = appWith({ onProblem: (error, _req, res) => void (problems.push(error.status), res.status(error.status).json({ mine: error.code })) });
    app.post('/x', (_req, res) => {
      res.write('part 1, ');
      res.end('part 2');
    });
    const url = await serve(app);
    const key = randomUUID();
    expect((await post(`${url}/x`, key)).status).toBe(200);
    const retry = await post(`${url}/x`, key);
    expect(retry.status).toBe(410);
    expect(retry.headers.get('idempotent-replayed')).toBe('true');
    expect(JSON.parse(new TextDecoder().decode(retry.body))).toMatchObject({ reason: 'not-bufferable', originalStatus: 200 });
    expect(problems).toEqual([]);
  });
});

async function raw(url: string, key: string): Promise<string> {
  // The status line with its reason phrase, which fetch does not show.
  const { request } = await import('node:http');
  return new Promise((resolve, reject) => {
    const req = request(url, { method: 'POST', headers: { 'idempotency-key': key, 'content-type': 'application/json' } }, (res) => {
      res.resume();
      res.on('end', () => resolve(`${res.statusCode} ${res.statusMessage} ${res.headers['cache-control'] ?? ''}`.trim()));
    });
    req.on('error', reject);
    req.end('{}');
  });
}

describe('express binding: empty bodies', () => {
  /** A POST written by hand: fetch sends `Content-Length: 0` for an empty body, curl sends none. */
  async function emptyPost(url: string, key: string, head: string, body = ''): Promise<{ status: number; replayed: boolean }> {
    const { port } = new URL(url);
    const socket = connect(Number(port), '127.0.0.1');
    socket.write(`POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: ${key}\r\n${head}Connection: close\r\n\r\n${body}`);
    const text = await new Promise<string>((resolve, reject) => {
      let out = '';
      socket.on('data', (chunk: Buffer) => (out += chunk.toString('latin1')));
      socket.on('end', () => resolve(out));
      socket.on('error', reject);
    });
    return { status: Number(text.split(' ')[1]), replayed: /\r\nidempotent-replayed: true\r\n/i.test(text) };
  }

  // Express 5's json() makes {} of a Content-Length: 0 body and leaves a missing one undefined;
  // Express 4's makes {} of every request. Each pair, with and without a JSON content type.
  it.each([
    ['Express 5', 'with', express, 'Content-Type: application/json\r\n'],
    ['Express 5', 'without', express, ''],
    ['Express 4', 'with', express4, 'Content-Type: application/json\r\n'],
    ['Express 4', 'without', express4, ''],
  ])('%s: Content-Length: 0, 00 and no body at all are one request (%s a JSON content type)', async (_version, _with, framework, type) => {
    let runs = 0;
    const app = framework();
    app.use(framework.json());
    app.use(idempotency({ store: createMemoryStore(), logger: false }));
    app.post('/orders', (_req: Request, res: Response) => void res.status(201).json({ run: ++runs }));
    const url = await serve(app);
    const key = randomUUID();
    expect(await emptyPost(url, key, `${type}Content-Length: 0\r\n`)).toEqual({ status: 201, replayed: false });
    // Before, these got 422: the parser's {} and undefined fingerprinted apart.
    expect(await emptyPost(url, key, type)).toEqual({ status: 201, replayed: true });
    expect(await emptyPost(url, key, `${type}Content-Length: 00\r\n`)).toEqual({ status: 201, replayed: true });
    expect(runs).toBe(1);
  });

  // A stream body that turned out empty goes out chunked with no bytes (`0`); its retry through
  // a client that buffers it sends `Content-Length: 0`. json() and urlencoded() make `{}` of it.
  it.each([
    ['Express 5', 'application/json', express],
    ['Express 5', 'application/x-www-form-urlencoded', express],
    ['Express 4', 'application/json', express4],
  ])('%s: an empty chunked body (%s) and Content-Length: 0 are one request', async (_version, type, framework) => {
    let runs = 0;
    const app = framework();
    app.use(framework.json());
    app.use(framework.urlencoded({ extended: false }));
    app.use(idempotency({ store: createMemoryStore(), logger: false }));
    app.post('/orders', (_req: Request, res: Response) => void res.status(201).json({ run: ++runs }));
    const url = await serve(app);
    const key = randomUUID();
    expect(await emptyPost(url, key, `Content-Type: ${type}\r\nTransfer-Encoding: chunked\r\n`, '0\r\n\r\n')).toEqual({ status: 201, replayed: false });
    // Before, 422: the parser's {} fingerprinted as a body.
    expect(await emptyPost(url, key, `Content-Type: ${type}\r\nContent-Length: 0\r\n`)).toEqual({ status: 201, replayed: true });
    expect(await emptyPost(url, key, `Content-Type: ${type}\r\nTransfer-Encoding: chunked\r\n`, '0\r\n\r\n')).toEqual({ status: 201, replayed: true });
    // A chunked body with bytes is still a body: {} sent chunked is another request.
    expect(await emptyPost(url, key, `Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n`, '2\r\n{}\r\n0\r\n\r\n')).toEqual({ status: 422, replayed: false });
    expect(runs).toBe(1);
  });

  // Express 4's body-parser sets `req.body = {}` for a type it skips: a form posted to an
  // express.json()-only app fingerprinted as `{}`, like every other such form, so another amount
  // under a reused key got the first one's answer (a replay). Now the 415 Express 5 gives.
  it.each([
    ['Express 4', express4],
    ['Express 5', express],
  ])('%s: a body of a type no mounted parser reads is a 415, never a replay of another body; a JSON {} still replays', async (_version, framework) => {
    let runs = 0;
    const app = framework();
    app.use(framework.json());
    app.use(idempotency({ store: createMemoryStore(), logger: false }));
    app.post('/orders', (_req: Request, res: Response) => void res.status(201).json({ run: ++runs }));
    app.use((error: { status?: number; code?: string }, _req: Request, res: Response, _next: NextFunction) => void res.status(error.status ?? 500).json({ code: error.code }));
    const url = await serve(app);
    const form = (amount: number): RequestInit => ({ headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: `amount=${amount}` });
    const key = randomUUID();
    for (const amount of [100, 999]) {
      const res = await post(`${url}/orders`, key, form(amount));
      expect(res.status).toBe(415);
      expect(JSON.parse(new TextDecoder().decode(res.body))).toEqual({ code: 'ERR_IDEMKIT_BODY_NOT_PARSED' });
    }
    expect(runs).toBe(0);
    const json = { headers: { 'content-type': 'application/json' }, body: '{}' };
    const other = randomUUID();
    expect((await post(`${url}/orders`, other, json)).status).toBe(201);
    const again = await post(`${url}/orders`, other, json);
    expect(again.status).toBe(201);
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect(runs).toBe(1);
  });

  // A platform that parsed the body before the app (a serverless adapter building the request
  // from its event, as Vercel's and Cloud Functions' bridges hand over theirs) flags it parsed as
  // body-parser does (`req._body`), and nobody reads its stream again. f5c089d took its JSON `{}`
  // for Express 4's placeholder (stream unread): 415 for a body that was parsed.
  // Express 5's body-parser does not look at `_body` (it would wait on the stream): no parser there.
  it.each([
    ['Express 4', express4, true],
    ['Express 5', express, false],
  ])('%s: a JSON {} a platform parsed before the app (flagged `_body`, stream never read) is fingerprinted, not a 415', async (_version, framework, parser) => {
    let runs = 0;
    const app = framework();
    if (parser) app.use(framework.json());
    app.use(idempotency({ store: createMemoryStore(), logger: false }));
    app.post('/orders', (_req: Request, res: Response) => void res.status(201).json({ run: ++runs }));
    app.use((error: { status?: number; code?: string }, _req: Request, res: Response, _next: NextFunction) => void res.status(error.status ?? 500).json({ code: error.code }));
    const url = await servePlatform(app as Express, (req, body) => Object.assign(new IncomingMessage(req.socket), { method: req.method, url: req.url, headers: req.headers, body, _body: true }));
    const json = { headers: { 'content-type': 'application/json' }, body: '{}' };
    const key = randomUUID();
    const first = await post(`${url}/orders`, key, json);
    expect(first.status).toBe(201);
    const again = await post(`${url}/orders`, key, json);
    expect(again.status).toBe(201);
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect((await post(`${url}/orders`, key, { ...json, body: '{"amount":999}' })).status).toBe(422);
    expect(runs).toBe(1);
  });

  // A request object that is no stream at all (azure-function-express builds an EventEmitter from
  // the function's event; node-mocks-http does too) with the platform's parsed body and no
  // parser in the app: Express gives it IncomingMessage's prototype, whose `readableEnded` reads
  // false without a stream behind it, so its JSON `{}` was taken for Express 4's unread
  // placeholder and answered 415.
  it.each([
    ['Express 4', express4],
    ['Express 5', express],
  ])('%s: a JSON {} on a request object that is no stream (a platform\'s parsed body, no parser) is fingerprinted, not a 415', async (_version, framework) => {
    let runs = 0;
    const app = framework();
    app.use(idempotency({ store: createMemoryStore(), logger: false }));
    app.post('/orders', (_req: Request, res: Response) => void res.status(201).json({ run: ++runs }));
    app.use((error: { status?: number; code?: string }, _req: Request, res: Response, _next: NextFunction) => void res.status(error.status ?? 500).json({ code: error.code }));
    const url = await servePlatform(app as Express, (req, body) => Object.assign(new EventEmitter(), { method: req.method, url: req.url, headers: req.headers, socket: req.socket, connection: req.socket, body }));
    const json = { headers: { 'content-type': 'application/json' }, body: '{}' };
    const key = randomUUID();
    expect((await post(`${url}/orders`, key, json)).status).toBe(201);
    const again = await post(`${url}/orders`, key, json);
    expect(again.status).toBe(201);
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect((await post(`${url}/orders`, key, { ...json, body: '{"amount":999}' })).status).toBe(422);
    expect(runs).toBe(1);
  });

  it('an empty request and one with a body are still two requests: 422 under the same key', async () => {
    const { app, runs } = appWith();
    app.post('/orders', (_req, res) => void res.status(201).json({ created: true }));
    const url = await serve(app);
    const key = randomUUID();
    expect(await emptyPost(url, key, 'Content-Type: application/json\r\nContent-Length: 0\r\n')).toEqual({ status: 201, replayed: false });
    expect((await post(`${url}/orders`, key, { headers: { 'content-type': 'application/json' }, body: '{"sku":"A-1"}' })).status).toBe(422);
    expect(runs()).toBe(1);
  });

  // The parser read that empty chunked body (it carries none): a keyless one passed through with
  // `required: false` was still warned about as a JSON body "no parser read", told to mount the
  // parser the app had mounted.
  it('a keyless empty chunked JSON body is not warned about as unread (required: false, json() mounted)', async () => {
    const warn = vi.fn();
    const app = express();
    app.use(express.json());
    app.use(idempotency({ store: createMemoryStore(), required: false, logger: { warn, error: vi.fn() } }));
    app.post('/orders', (_req, res) => void res.status(201).json({ created: true }));
    const url = await serve(app);
    const out = await rawExchange(url, 'POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n');
    expect(out).toMatch(/^HTTP\/1\.1 201 /);
    expect(warn).not.toHaveBeenCalled();
  });
});

describe('express binding: uploads (multer)', () => {
  const multipart = (files: Array<[field: string, content: string]>) =>
    `--X\r\nContent-Disposition: form-data; name="amount"\r\n\r\n10\r\n` +
    files.map(([field, content]) => `--X\r\nContent-Disposition: form-data; name="${field}"; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n${content}\r\n`).join('') +
    '--X--\r\n';

  it.each([
    ['memory storage, upload.single', () => multer({ storage: multer.memoryStorage() }).single('doc')],
    ['disk storage, upload.array', () => multer({ dest: tmpdir() }).array('doc')],
  ])("the file bytes are part of the fingerprint (%s): another file under the same key is a 422", async (_name, parser) => {
    let runs = 0;
    const app = express();
    app.post('/upload', parser(), idempotency({ store: createMemoryStore(), logger: false }), (req, res) => {
      runs++;
      res.status(201).json({ run: runs, fields: req.body as unknown });
    });
    const url = await serve(app);
    const upload = (content: string) =>
      post(`${url}/upload`, 'invoice-1', { headers: { 'content-type': 'multipart/form-data; boundary=X' }, body: multipart([['doc', content]]) });
    expect((await upload('invoice for ALICE')).status).toBe(201);
    // Before, only the fields were fingerprinted: BOB's upload got ALICE's answer.
    expect((await upload('invoice for BOB')).status).toBe(422);
    const again = await upload('invoice for ALICE');
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect(runs).toBe(1);
  });
});

describe('express binding: uploads (express-fileupload)', () => {
  it.each([false, true])('a form of files only is a body (useTempFiles: %s): replayed, and another file under the same key is a 422', async (useTempFiles) => {
    let runs = 0;
    const app = express();
    app.use(fileUpload({ useTempFiles, tempFileDir: tmpdir() }));
    app.use(idempotency({ store: createMemoryStore(), logger: false }));
    app.post('/upload', (_req, res) => {
      runs++;
      res.status(201).json({ run: runs });
    });
    const url = await serve(app);
    const upload = (content: string) =>
      post(`${url}/upload`, 'invoice-1', {
        headers: { 'content-type': 'multipart/form-data; boundary=X' },
        body: `--X\r\nContent-Disposition: form-data; name="doc"; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n${content}\r\n--X--\r\n`,
      });
    // Before, it was a 415: express-fileupload sets req.body only when a text field arrives.
    expect((await upload('invoice for ALICE')).status).toBe(201);
    // A form whose one file input was left empty (express-fileupload sets req.files to null).
    const empty = await post(`${url}/upload`, 'invoice-2', {
      headers: { 'content-type': 'multipart/form-data; boundary=X' },
      body: '--X\r\nContent-Disposition: form-data; name="doc"; filename=""\r\nContent-Type: application/octet-stream\r\n\r\n\r\n--X--\r\n',
    });
    expect(empty.status).toBe(201);
    expect((await upload('invoice for BOB')).status).toBe(422);
    expect((await upload('invoice for ALICE')).headers.get('idempotent-replayed')).toBe('true');
    expect(runs).toBe(2);
  });
});

describe('express binding: uploads kept elsewhere (a storage engine that keeps no bytes here, as an S3 one)', () => {
  // multer's storage engine interface: drain the upload, report only where it "went".
  const remote = multer({
    storage: {
      _handleFile(_req: Request, file: { stream: NodeJS.ReadableStream }, cb: (error: Error | null, info?: object) => void) {
        file.stream.resume();
        file.stream.on('end', () => cb(null, { location: 'https://bucket.example/a.txt' }));
      },
      _removeFile(_req: Request, _file: unknown, cb: (error: Error | null) => void) {
        cb(null);
      },
    } as unknown as multer.StorageEngine,
  });
  const body = '--X\r\nContent-Disposition: form-data; name="doc"; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\nbytes\r\n--X--\r\n';
  const headers = { 'content-type': 'multipart/form-data; boundary=X' };

  it('a keyless upload is never hashed: through with required: false; a keyed one is refused with a message that says why', async () => {
    const app = express();
    app.post('/upload', remote.single('doc'), idempotency({ store: createMemoryStore(), logger: false, required: false }), (_req, res) => void res.sendStatus(201));
    app.use(((err: Error, _req, res, _next) => void res.status(500).json({ message: err.message })) as ErrorRequestHandler);
    const url = await serve(app);
    // Before, every upload here was a 500, keyless or not: the files were hashed before the key was looked at.
    expect((await post(`${url}/upload`, undefined, { body, headers })).status).toBe(201);
    const keyed = await post(`${url}/upload`, randomUUID(), { body, headers });
    expect(keyed.status).toBe(500);
    expect(new TextDecoder().decode(keyed.body)).toContain('neither its bytes');
  });
});

describe('express binding: transactional mode', () => {
  /** A transaction whose completion fails (as a COMMIT can): nothing committed, the key is freed. */
  function failingCommitApp(): Express {
    const store: TransactionalStore<null> = Object.assign(createMemoryStore(), {
      async beginTransaction(): Promise<StoreTransaction<null>> {
        return { client: null, complete: () => Promise.reject(new Error('COMMIT failed')), rollback: async () => undefined };
      },
    });
    const app = express();
    app.use(express.json());
    app.use(idempotency({ store, transactional: true, logger: false }));
    return app;
  }

  it('a rolled-back answer is replaced by the 503, without the handler reason phrase', async () => {
    const app = failingCommitApp();
    app.post('/tx', (_req, res) => {
      res.statusMessage = 'Order Created';
      res.status(201).type('text/plain').send('created');
    });
    const url = await serve(app);
    expect(await raw(`${url}/tx`, randomUUID())).toBe('503 Service Unavailable');
    const reply = await post(`${url}/tx`, randomUUID());
    expect(reply.status).toBe(503);
    expect(reply.headers.get('content-type')).toBe('application/problem+json');
    expect(new TextDecoder().decode(reply.body)).toContain('rolled back');
  });

  it('a rolled-back answer under compression() and a session mounted before idempotency(): the 503 goes out whole and readable', async () => {
    const store: TransactionalStore<null> = Object.assign(createMemoryStore(), {
      async beginTransaction(): Promise<StoreTransaction<null>> {
        return { client: null, complete: () => Promise.reject(new Error('COMMIT failed')), rollback: async () => undefined };
      },
    });
    const app = express();
    app.use(compression({ threshold: 0 }));
    app.use(cookieSession({ name: 'sess', keys: ['k'] }));
    app.use(express.json());
    app.use(idempotency({ store, transactional: true, logger: false }));
    app.post('/tx', (req, res) => {
      (req.session as unknown as Record<string, unknown>)['user'] = 'alice';
      res.status(201).json({ created: true });
    });
    app.use(idempotencyErrorHandler());
    const url = await serve(app);
    const reply = await post(`${url}/tx`, randomUUID(), { headers: { 'accept-encoding': 'gzip' } });
    expect(reply.status).toBe(503);
    expect(reply.headers.get('content-type')).toBe('application/problem+json');
    expect(new TextDecoder().decode(reply.body)).toContain('rolled back');
  });

  it('a rolled-back answer whose head was written with res.writeHead cuts the connection instead of answering 201', async () => {
    const app = failingCommitApp();
    app.post('/tx', (_req, res) => {
      res.writeHead(201, { 'content-type': 'text/plain' });
      res.end('created');
    });
    const url = await serve(app);
    // No other status can follow a written head; a 201 would claim writes that were rolled back.
    await expect(post(`${url}/tx`, randomUUID())).rejects.toThrow();
  });

  it('a rolled-back answer the handler streamed (res.write) is replaced by the 503: nothing of it went out before the commit', async () => {
    const app = failingCommitApp();
    let told: unknown;
    app.post('/tx', (_req, res) => {
      res.status(201).type('text/plain');
      res.write('part1;');
      res.write('part2;', (error?: Error | null) => void (told = error));
      res.end('part3');
    });
    const url = await serve(app);
    // Before: 201 "part1;part2;part3", a whole answer for writes that were rolled back.
    const reply = await post(`${url}/tx`, randomUUID());
    expect(reply.status).toBe(503);
    expect(reply.headers.get('content-type')).toBe('application/problem+json');
    expect(new TextDecoder().decode(reply.body)).toContain('rolled back');
    await vi.waitFor(() => expect(told).toMatchObject({ code: 'ERR_STREAM_DESTROYED' }));
  });

  it('a rolled-back 204 the handler wrote to or piped into (Node drops the bytes) is replaced by the 503, as a res.write() answer is', async () => {
    const app = failingCommitApp();
    let called = 0;
    app.post('/w', (_req, res) => {
      res.status(204).set('x-a', 'b');
      res.write('dropped', () => void called++);
      res.end();
    });
    app.post('/pipe', (_req, res) => {
      res.status(204);
      Readable.from(['dropped']).pipe(res);
    });
    const url = await serve(app);
    for (const path of ['w', 'pipe']) {
      // Before: Node's write stored the 204 head, so the rollback could only cut the connection.
      const reply = await post(`${url}/${path}`, randomUUID());
      expect([path, reply.status]).toEqual([path, 503]);
      expect(new TextDecoder().decode(reply.body)).toContain('rolled back');
    }
    expect(called).toBe(1);
  });

  it('a rolled-back streamed answer whose head was written with res.writeHead cuts the connection', async () => {
    const app = failingCommitApp();
    app.post('/tx', (_req, res) => {
      res.writeHead(201, { 'content-type': 'text/plain' });
      res.write('part1;');
      res.end('part2');
    });
    const url = await serve(app);
    await expect(post(`${url}/tx`, randomUUID())).rejects.toThrow();
  });

  /** A transactional store whose COMMIT takes `commitMs` and succeeds; `onCommit` runs just before it lands. */
  function committingApp(commitMs: number, onCommit: () => void = () => undefined, make: () => Express = express): { app: Express; committed: () => boolean } {
    const memory = createMemoryStore();
    let committed = false;
    const store: TransactionalStore<null> = Object.assign(memory, {
      async beginTransaction(): Promise<StoreTransaction<null>> {
        return {
          client: null,
          complete: async (...args: Parameters<StoreTransaction['complete']>) => {
            await new Promise((r) => setTimeout(r, commitMs)); // a COMMIT's round trip
            onCommit();
            committed = await memory.complete(...args);
            return committed;
          },
          rollback: async () => undefined,
        };
      },
    });
    const app = make();
    app.use(idempotency({ store, transactional: true, logger: false }));
    return { app, committed: () => committed };
  }

  it('writeHead(202), a status set too late, then a stream ended at once: goes out whole after the commit, not cut as an error answer', async () => {
    const { app } = committingApp(50);
    app.post('/late', (_req, res) => {
      res.writeHead(202, { 'content-type': 'text/plain' });
      res.statusCode = 500; // goes nowhere: the head holds 202
      res.write('a');
      res.end('b');
    });
    const url = await serve(app);
    const key = randomUUID();
    // Before: the 500 was taken for an error handler's answer over the stream, and the
    // connection was cut though the transaction committed.
    const reply = await post(`${url}/late`, key);
    expect(reply.status).toBe(202);
    expect(new TextDecoder().decode(reply.body)).toBe('ab');
    expect((await post(`${url}/late`, key)).status).toBe(410);
  });

  it('a streamed answer whose transaction commits goes out whole, after the commit, and retries get 410', async () => {
    const { app, committed } = committingApp(50);
    const seenBeforeCommit: boolean[] = [];
    app.post('/tx', (_req, res) => {
      res.status(201).type('text/plain');
      res.write('part1;');
      res.once('finish', () => seenBeforeCommit.push(committed()));
      res.end('part2');
    });
    const url = await serve(app);
    const key = randomUUID();
    const reply = await post(`${url}/tx`, key);
    expect(reply.status).toBe(201);
    expect(new TextDecoder().decode(reply.body)).toBe('part1;part2');
    expect(seenBeforeCommit).toEqual([true]);
    expect((await post(`${url}/tx`, key)).status).toBe(410);
  });

  it.each([
    ['Express 5', express],
    ['Express 4', express4 as unknown as () => Express],
  ])("%s: a stream the handler broke off with a throw is cut, as without transactions: the error page never goes out over its bytes", async (_, make) => {
    const { app } = committingApp(50, undefined, make);
    app.post('/tx', (_req, res) => {
      res.status(200).type('text/plain');
      res.write('partial-');
      throw new Error('boom');
    });
    const url = await serve(app);
    // A GET pipelined behind the POST on one connection: it must not read leftover bytes.
    const seen = await rawExchange(url, keyedPost('/tx', NEXT_GET));
    // Before: "500 Internal Server Error", Content-Length 148, then "partial-<!DOCTYPE html>…"
    // (156 bytes) and the GET's answer read from the middle of it.
    expect(seen).toMatch(/^HTTP\/1\.1 200 OK/);
    expect(seen).toContain('partial-');
    expect(seen).not.toContain('DOCTYPE');
    expect(seen).not.toMatch(/HTTP\/1\.1 (404|500)/);
  });

  it('held streams that change nothing wrong finish whole: compression() after idempotency() with flushHeaders (SSE), a Content-Length gzip removes, a write past the high-water mark then flushHeaders', async () => {
    const unhandled = unhandledErrors();
    const { app } = committingApp(50);
    app.use(compression({ threshold: 0 }));
    app.post('/sse', (_req, res) => {
      res.setHeader('content-type', 'text/plain');
      res.flushHeaders();
      res.write('hello-');
      res.end('world');
    });
    app.post('/length-gzip', (_req, res) => {
      res.type('text/plain');
      res.setHeader('content-length', 10); // compression() removes it when it gzips
      res.flushHeaders();
      res.write('hello');
      res.end('world');
    });
    const events: string[] = [];
    app.post('/big-then-flush', async (_req, res) => {
      res.type('application/octet-stream');
      res.on('drain', () => events.push(res.writableFinished ? 'drain after finish' : 'drain'));
      res.on('finish', () => events.push('finish'));
      const full = res.write(Buffer.alloc(100 * 1024, 1));
      res.flushHeaders();
      if (!full) await once(res, 'drain');
      res.end('z');
    });
    const url = await serve(app);
    // Before: ERR_HTTP_HEADERS_SENT thrown from the release (an unhandled rejection: the process exited).
    const sse = await post(`${url}/sse`, randomUUID(), { headers: { 'accept-encoding': 'identity' } });
    expect(sse.status).toBe(200);
    expect(new TextDecoder().decode(sse.body)).toBe('hello-world');
    // Before: ECONNRESET, nothing received (the gzip head's missing Content-Length taken for an
    // answer over the stream).
    const gzipped = await post(`${url}/length-gzip`, randomUUID(), { headers: { 'accept-encoding': 'gzip' } });
    expect(gzipped.status).toBe(200);
    expect(new TextDecoder().decode(gzipped.body)).toBe('helloworld');
    // Before: cut after the first 100 KB; 'drain' never came.
    const big = await post(`${url}/big-then-flush`, randomUUID());
    expect(big.body.byteLength).toBe(100 * 1024 + 1);
    expect(events).not.toContain('drain after finish');
    expect(events.filter((e) => e === 'drain').length).toBeLessThanOrEqual(1);
    expect(unhandled).toEqual([]);
  });

  it('compression() after idempotency(): a status set or an error after flushHeaders() neither crashes the process nor passes for a whole answer', async () => {
    const unhandled = unhandledErrors(['unhandledRejection', 'uncaughtException']);
    const { app } = committingApp(50);
    app.use(compression({ threshold: 0 }));
    app.post('/flush-throw', (_req, res) => {
      res.type('text/plain');
      res.flushHeaders();
      throw new Error('boom');
    });
    app.post('/flush-status', (_req, res) => {
      res.flushHeaders();
      res.status(201); // after the head went out: counts for nothing, as in Node
      res.write('a-');
      res.end('b');
    });
    app.post('/flush-pipe', (_req, res) => {
      res.flushHeaders();
      res.status(202);
      Readable.from(['p1-', 'p2']).pipe(res);
    });
    app.post('/flush-later-error', (_req, res, next) => {
      res.type('text/plain');
      res.flushHeaders();
      setTimeout(() => next(new Error('later')), 10);
    });
    const url = await serve(app);
    const raw = (path: string): Promise<string> => rawExchange(url, keyedPost(path).replace('\r\n\r\n', '\r\nConnection: close\r\n\r\n'));
    // Before: ERR_HTTP_HEADERS_SENT thrown from compression's writeHead call, uncaught: the process
    // exited. Now the stream's own head goes out, then its bytes; an answer with a status of its
    // own over it (an error page, or a status set after the head) is dropped and the connection
    // cut, so the client never takes it for a whole answer.
    for (const [path, bytes] of [['/flush-throw', ''], ['/flush-later-error', ''], ['/flush-status', 'a-'], ['/flush-pipe', 'p1-']] as const) {
      const seen = await raw(path);
      expect(seen).toMatch(/^HTTP\/1\.1 200 OK/);
      expect(seen).toContain(bytes);
      expect(seen).not.toMatch(/DOCTYPE|Error|Content-Length|\r\n0\r\n\r\n$/i);
    }
    await new Promise((r) => setTimeout(r, 100));
    expect(unhandled).toEqual([]);
  });

  it('an error answer without a length, over a stream the handler broke off, is not sent as its end (the client sees a cut, not a whole 200)', async () => {
    const { app } = committingApp(50);
    app.post('/tx', (_req, res) => {
      res.type('text/plain');
      res.write('partial-');
      throw new Error('boom');
    });
    app.use(((err: Error, _req, res, next) => {
      if (res.headersSent) return next(err); // false while the stream is held
      res.statusCode = 500;
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ error: err.message }));
    }) as ErrorRequestHandler);
    const url = await serve(app);
    const seen = await rawExchange(url, keyedPost('/tx', NEXT_GET));
    // Before: a complete chunked 200 "partial-{"error":"boom"}", and /next served after it.
    expect(seen).toMatch(/^HTTP\/1\.1 200 OK/);
    expect(seen).toContain('partial-');
    expect(seen).not.toContain('boom');
    expect(seen).not.toMatch(/HTTP\/1\.1 404/);
  });

  it('after a rollback, a handler waiting for drain goes on to its end instead of hanging', async () => {
    const app = failingCommitApp();
    let done = false;
    app.post('/tx', async (_req, res) => {
      res.type('application/octet-stream');
      const chunk = Buffer.alloc(16 * 1024, 1);
      for (let i = 0; i < 40; i++) if (!res.write(chunk)) await once(res, 'drain');
      res.end();
      done = true;
    });
    const url = await serve(app);
    expect((await post(`${url}/tx`, randomUUID())).status).toBe(503);
    // Before: stuck waiting for a 'drain' that never came.
    await vi.waitFor(() => expect(done).toBe(true), { timeout: 3_000 });
  });

  it("an error handler's writeHead over a held stream does not crash the process", async () => {
    const unhandled = unhandledErrors();
    const { app } = committingApp(50);
    app.post('/tx', (_req, res) => {
      res.type('text/plain');
      res.write('partial-');
      throw new Error('boom');
    });
    app.get('/alive', (_req, res) => void res.send('yes'));
    app.use(((_err, _req, res, _next) => {
      res.writeHead(500, { 'content-type': 'text/plain' });
      res.end('oops');
    }) as ErrorRequestHandler);
    const url = await serve(app);
    // Before: ERR_HTTP_HEADERS_SENT from restore() in the release, unhandled: the process exited;
    // then a whole 500 "partial-oops". As without transactions, its writeHead now throws
    // ERR_HTTP_HEADERS_SENT, and the client gets the 200 and "partial-", then a cut.
    const seen = await rawExchange(url, keyedPost('/tx'));
    expect(seen).toMatch(/^HTTP\/1\.1 200 OK/);
    expect(seen).toContain('partial-');
    expect(seen).not.toContain('oops');
    expect(unhandled).toEqual([]);
    expect(await (await fetch(`${url}/alive`)).text()).toBe('yes');
  });

  it('a large piped stream waits while its commit is held: write() says wait, and all of it arrives after', async () => {
    let produced = 0;
    let producedAtCommit = -1;
    const { app } = committingApp(200, () => (producedAtCommit = produced));
    const total = 8 * 1024 * 1024;
    app.post('/tx', (_req, res) => {
      res.status(200).type('application/octet-stream');
      const chunk = Buffer.alloc(64 * 1024, 7);
      const source = new Readable({
        read() {
          if (produced >= total) return void this.push(null);
          produced += chunk.byteLength;
          this.push(chunk);
        },
      });
      source.pipe(res);
    });
    const url = await serve(app);
    const reply = await post(`${url}/tx`, randomUUID());
    expect(reply.status).toBe(200);
    expect(reply.body.byteLength).toBe(total);
    // Before: the whole 8 MiB was read into memory while the COMMIT was on its way.
    expect(producedAtCommit).toBeGreaterThan(0);
    expect(producedAtCommit).toBeLessThan(1024 * 1024);
  });

  it('the end() callback of such a cut answer gets the error, so a handler awaiting it is not left hanging', async () => {
    const app = failingCommitApp();
    let told: unknown;
    const settled = new Promise<void>((resolve) => {
      app.post('/tx', (_req, res) => {
        res.writeHead(201, { 'content-type': 'text/plain' });
        res.end('created', (error?: Error | null) => {
          told = error;
          resolve();
        });
      });
    });
    const url = await serve(app);
    await expect(post(`${url}/tx`, randomUUID())).rejects.toThrow();
    await settled;
    expect(told).toMatchObject({ code: 'ERR_STREAM_DESTROYED' });
  });
});

describe('express binding: transactional mode without idempotencyErrorHandler()', () => {
  const created = Symbol.for('idemkit.express.errorHandlerCreated');
  const global = globalThis as Record<symbol, unknown>;

  function transactionalApp(logger: { warn: (message: string) => void; error: () => void }): Express {
    const store: TransactionalStore<null> = Object.assign(createMemoryStore(), {
      async beginTransaction(): Promise<StoreTransaction<null>> {
        return { client: null, complete: async () => true, rollback: async () => undefined };
      },
    });
    const app = express();
    app.use(express.json());
    app.use(idempotency({ store, transactional: true, logger }));
    app.post('/tx', (_req, res) => void res.status(201).send('created'));
    return app;
  }

  it('warns once, at the first transactional run, when the error handler was never created; not once it was', async () => {
    const before = global[created];
    delete global[created];
    try {
      const warnings: string[] = [];
      const logger = { warn: (message: string) => void warnings.push(message), error: () => undefined };
      const url = await serve(transactionalApp(logger));
      expect(warnings).toEqual([]);
      expect((await post(`${url}/tx`, randomUUID())).status).toBe(201);
      expect((await post(`${url}/tx`, randomUUID())).status).toBe(201);
      expect(warnings).toHaveLength(1);
      expect(warnings[0]).toMatch(/without idempotencyErrorHandler\(\).*commits the handler's writes/);

      idempotencyErrorHandler();
      const quiet: string[] = [];
      const url2 = await serve(transactionalApp({ warn: (message) => void quiet.push(message), error: () => undefined }));
      expect((await post(`${url2}/tx`, randomUUID())).status).toBe(201);
      expect(quiet).toEqual([]);
    } finally {
      global[created] = before;
    }
  });
});

describe('express binding: a handler that throws after res.writeHead', () => {
  it('without idempotencyErrorHandler the key is not held for good: its lease runs out and a retry runs', async () => {
    const { app, runs } = appWith({ leaseMs: 600 });
    let calls = 0;
    app.post('/x', (_req, res) => {
      res.writeHead(201, { 'content-type': 'text/plain' });
      if (++calls === 1) throw new Error('boom after writeHead');
      res.end('created');
    });
    // Express's final handler cuts the connection: headers count as sent, nothing more can go out.
    app.use(((_err, _req, res, next) => (res.headersSent ? next(_err) : res.status(500).end())) as ErrorRequestHandler);
    const url = await serve(app);
    const key = randomUUID();
    await expect(post(`${url}/x`, key)).rejects.toThrow();
    // First 409 (the lease still runs out), then a takeover that runs the handler again.
    const retry = await postUntil(201, `${url}/x`, key);
    expect(new TextDecoder().decode(retry.body)).toBe('created');
    expect(calls).toBe(2);
    expect(runs()).toBeGreaterThanOrEqual(2);
  });

  it.each([
    ['throws', (): void => {
      throw new Error('boom after writeHead');
    }],
    ['rejects (Express 5)', async (): Promise<void> => {
      await new Promise((resolve) => setImmediate(resolve));
      throw new Error('boom after writeHead');
    }],
  ])('with idempotencyErrorHandler, a handler that %s after res.writeHead alone frees its key at once: the retry runs, no 409 for a lease', async (_name, fail) => {
    // A lease far longer than the test: a retry that has to wait for it never gets its 201.
    const { app } = appWith({ leaseMs: 60_000 });
    let calls = 0;
    app.post('/x', async (_req, res) => {
      res.writeHead(201, { 'content-type': 'text/plain' });
      if (++calls === 1) return fail();
      res.end('created');
    });
    app.use(idempotencyErrorHandler());
    const url = await serve(app);
    const key = randomUUID();
    // Nothing went out but the head Node holds: Express's final handler cuts the connection.
    await expect(post(`${url}/x`, key)).rejects.toThrow();
    const retry = await post(`${url}/x`, key);
    expect(retry.status).toBe(201);
    expect(new TextDecoder().decode(retry.body)).toBe('created');
    expect(calls).toBe(2);
  });

  // The key is freed at once for a head-only throw, so nothing more of that answer may go out: an
  // error handler of the app's that ends it anyway (`res.end()` needs no header) completed the
  // thrown handler's 201 while the retry ran the operation again.
  it('with idempotencyErrorHandler, an error handler that ends a head-only answer after it cannot deliver a 201 whose retry runs again', async () => {
    const { app } = appWith({ leaseMs: 60_000 });
    let calls = 0;
    app.post('/x', (_req, res) => {
      res.writeHead(201, { 'content-type': 'text/plain' });
      if (++calls === 1) throw new Error('boom after writeHead');
      res.end('created');
    });
    app.use(idempotencyErrorHandler());
    const ended: unknown[] = [];
    app.use((err: Error, _req: Request, res: Response, _next: NextFunction) => void res.end(`error: ${err.message}`, (error?: unknown) => ended.push(error)));
    const url = await serve(app);
    const key = randomUUID();
    // Before, a complete 201 'error: boom after writeHead', and the retry below ran the handler again.
    await expect(post(`${url}/x`, key)).rejects.toThrow();
    // Its end() callback is called (with the destroyed stream's error), never left pending.
    await vi.waitFor(() => expect(ended).toMatchObject([{ code: 'ERR_STREAM_DESTROYED' }]));
    const retry = await post(`${url}/x`, key);
    expect(retry.status).toBe(201);
    expect(new TextDecoder().decode(retry.body)).toBe('created');
    expect(calls).toBe(2);
  });

  /** A handler that stops its work when its client leaves, and so never answers (a common abort pattern). */
  function stopsOnClose(app: Express, started: { count: number }): void {
    app.post('/work', (_req, res) => {
      started.count++;
      const timer = setTimeout(() => res.status(201).send('done'), 60_000);
      res.once('close', () => clearTimeout(timer));
    });
  }

  async function leaveEarly(url: string, key: string, started: { count: number }): Promise<void> {
    const controller = new AbortController();
    const first = post(`${url}/work`, key, { signal: controller.signal });
    const before = started.count;
    await vi.waitFor(() => expect(started.count).toBe(before + 1), { timeout: 10_000 });
    controller.abort();
    await expect(first).rejects.toThrow();
  }

  it('a handler that never answers once its client left: 410 cut-short a lease later, not 409 for good, never a second run', async () => {
    const { app } = appWith({ leaseMs: 300 });
    const started = { count: 0 };
    stopsOnClose(app, started);
    const url = await serve(app);
    const key = randomUUID();
    await leaveEarly(url, key, started);
    // Before, the lease was renewed for as long as the process lived: 409 with Retry-After forever.
    const retry = await postUntil(410, `${url}/work`, key);
    expect(JSON.parse(new TextDecoder().decode(retry.body))).toMatchObject({ reason: 'cut-short' });
    expect(started.count).toBe(1);
  });

  it('a handler slower than a lease whose client left: its late answer is not replayed, but it never runs twice', async () => {
    const { app } = appWith({ leaseMs: 300 });
    let runs = 0;
    let answer!: () => void;
    const late = new Promise<void>((resolve) => (answer = resolve));
    app.post('/slow', (_req, res) => {
      runs++;
      void late.then(() => res.status(201).send(`charge ${runs}`));
    });
    const url = await serve(app);
    const key = randomUUID();
    const controller = new AbortController();
    const first = post(`${url}/slow`, key, { signal: controller.signal });
    await vi.waitFor(() => expect(runs).toBe(1), { timeout: 10_000 });
    controller.abort();
    await expect(first).rejects.toThrow();
    // A lease after the client left, the key is marked: the retry is told, and does not charge again.
    await vi.waitFor(async () => expect((await post(`${url}/slow`, key)).status).toBe(410), { timeout: 5_000, interval: 100 });
    answer();
    expect((await post(`${url}/slow`, key)).status).toBe(410);
    expect(runs).toBe(1);
  });

  // Node never closes a response queued behind another when the connection dies: the socket's
  // close stands in (the case Koa's binding missed for a handler still running).
  it('pipelined behind a slow answer, the connection dies, the handler never answers: 410 cut-short a lease later, not 409 for good', async () => {
    const { app } = appWith({ leaseMs: 300 });
    let runs = 0;
    let slowClosed = false;
    app.get('/slow', (_req, res) => void res.once('close', () => (slowClosed = true)));
    app.post('/hang', () => void runs++); // an upstream call that never comes back
    const url = await serve(app);
    const key = randomUUID();
    const socket = connect(Number(new URL(url).port), '127.0.0.1');
    socket.on('error', () => undefined);
    await once(socket, 'connect');
    socket.write(`GET /slow HTTP/1.1\r\nHost: x\r\n\r\nPOST /hang HTTP/1.1\r\nHost: x\r\nIdempotency-Key: ${key}\r\nContent-Length: 0\r\n\r\n`);
    await vi.waitFor(() => expect(runs).toBe(1), { timeout: 10_000 });
    socket.destroy();
    await vi.waitFor(() => expect(slowClosed).toBe(true), { timeout: 10_000 }); // the server saw it
    const retry = await postUntil(410, `${url}/hang`, key);
    expect(JSON.parse(new TextDecoder().decode(retry.body))).toMatchObject({ reason: 'cut-short' });
    expect(runs).toBe(1);
  });

  it('many pipelined requests on one connection wait for its close behind one listener: no MaxListenersExceededWarning', async () => {
    const warnings: Error[] = [];
    const onWarning = (warning: Error): void => void warnings.push(warning);
    process.on('warning', onWarning);
    try {
      const { app } = appWith();
      let open!: () => void;
      const first = new Promise<void>((resolve) => (open = resolve));
      let queued = 0;
      app.post('/first', (_req, res) => void first.then(() => res.status(201).send('first')));
      app.post('/orders', (_req, res) => {
        queued++;
        res.status(201).send('ok');
      });
      const url = await serve(app);
      const request = (path: string, key: string): string =>
        `POST ${path} HTTP/1.1\r\nHost: x\r\nIdempotency-Key: ${key}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}`;
      const socket = connect(Number(new URL(url).port), '127.0.0.1');
      let received = '';
      socket.on('data', (chunk: Buffer) => void (received += chunk.toString()));
      // Fifteen keyed requests queue behind a slow first one: each waits for the socket's close.
      socket.write(request('/first', randomUUID()) + Array.from({ length: 15 }, () => request('/orders', randomUUID())).join(''));
      await vi.waitFor(() => expect(queued).toBe(15), { timeout: 10_000 });
      open();
      await vi.waitFor(() => expect(received.match(/HTTP\/1\.1 201/g)).toHaveLength(16), { timeout: 10_000 });
      socket.destroy();
      await new Promise((resolve) => setImmediate(resolve));
      expect(warnings.filter((w) => w.name === 'MaxListenersExceededWarning')).toEqual([]);
    } finally {
      process.off('warning', onWarning);
    }
  });

  it('a pipelined request whose connection dies while it waits its turn is settled all the same', async () => {
    // Not shorter: an event loop stalled past the lease (a loaded machine) loses it to the retry.
    const { app } = appWith({ leaseMs: 1_000 });
    let queuedRuns = 0;
    app.post('/first', (_req, res) => void setTimeout(() => res.status(201).send('first'), 200));
    // Never answers (an Express 4 async handler that rejected, say); Node never closes its queued response.
    app.post('/queued', () => void queuedRuns++);
    const url = await serve(app);
    const { port } = new URL(url);
    const request = (path: string, key: string): string =>
      `POST ${path} HTTP/1.1\r\nHost: x\r\nIdempotency-Key: ${key}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}`;
    const socket = connect(Number(port), '127.0.0.1');
    socket.on('error', () => undefined);
    const key = randomUUID();
    socket.write(request('/first', randomUUID()) + request('/queued', key));
    await vi.waitFor(() => expect(queuedRuns).toBe(1), { timeout: 10_000 });
    socket.destroy();
    // Before, its key answered 409 for as long as the process ran.
    await vi.waitFor(async () => expect((await post(`${url}/queued`, key, { body: '{}', headers: { 'content-type': 'application/json' } })).status).toBe(410), { timeout: 10_000, interval: 100 });
    expect(queuedRuns).toBe(1);
  });

  it("in transactional mode, such a handler's transaction is rolled back and its connection returned", async () => {
    let open = 0;
    let rolledBack = 0;
    const memory = createMemoryStore();
    const store: TransactionalStore<null> = Object.assign(memory, {
      async beginTransaction(): Promise<StoreTransaction<null>> {
        open++;
        return {
          client: null,
          complete: (...args: Parameters<StoreTransaction<null>['complete']>) => memory.complete(...args),
          rollback: async () => {
            open--;
            rolledBack++;
          },
        };
      },
    });
    const app = express();
    app.use(express.json());
    app.use(idempotency({ store, transactional: true, leaseMs: 300, logger: false }));
    app.use(idempotencyErrorHandler());
    const started = { count: 0 };
    stopsOnClose(app, started);
    const url = await serve(app);
    for (let i = 0; i < 3; i++) await leaveEarly(url, randomUUID(), started);
    // Before, each held its transaction (a pooled connection) for good: three exhausted a pool of three.
    await vi.waitFor(() => expect({ open, rolledBack }).toEqual({ open: 0, rolledBack: 3 }), { timeout: 5_000, interval: 50 });
  });

  it('a client that leaves after the head went out still gets the answer stored when the handler ends', async () => {
    const { app, store } = appWith({ leaseMs: 5_000 });
    let release: (() => void) | undefined;
    const handlerDone = new Promise<void>((resolve) => (release = resolve));
    let ended: Promise<void> | undefined;
    let closed = false;
    app.post('/slow', (_req, res) => {
      res.once('close', () => (closed = true));
      res.writeHead(201, { 'content-type': 'text/plain' });
      ended = handlerDone.then(() => void res.end('late answer'));
    });
    const url = await serve(app);
    const key = randomUUID();
    const controller = new AbortController();
    const first = post(`${url}/slow`, key, { signal: controller.signal });
    await vi.waitFor(() => expect(ended).toBeDefined(), { timeout: 10_000 });
    controller.abort();
    await expect(first).rejects.toThrow();
    // The server has seen the client go before the handler answers.
    await vi.waitFor(() => expect(closed).toBe(true), { timeout: 10_000 });
    release?.();
    await ended;
    await vi.waitFor(async () => expect((await store.get(scopedKey(undefined, key)))?.state).toBe('completed'), { timeout: 10_000 });
    const retry = await post(`${url}/slow`, key);
    expect(retry.status).toBe(201);
    expect(retry.headers.get('idempotent-replayed')).toBe('true');
    expect(new TextDecoder().decode(retry.body)).toBe('late answer');
  });
});

describe('express binding: res.writeHead while the answer is buffered behaves as in Node', () => {
  it('a string status works, a second writeHead throws, array headers replace earlier ones, the reason phrase is kept', async () => {
    const { app } = appWith();
    const errors: string[] = [];
    app.post('/string', (_req, res) => void (res.writeHead('201' as unknown as number, 'Order Created', { 'content-type': 'text/plain' }) as typeof res).end('ok'));
    app.post('/twice', (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/plain' });
      try {
        res.writeHead(500);
      } catch (error) {
        errors.push((error as { code?: string }).code ?? '');
      }
      res.end('ok');
    });
    const leaked: boolean[] = [];
    app.post('/invalid', (_req, res) => {
      try {
        res.writeHead(1000, { 'x-leak': '1' });
      } catch {
        // Node refuses the status before it sets any header.
        leaked.push(res.hasHeader('x-leak'));
        res.status(500).end();
      }
    });
    app.post('/array', (_req, res) => {
      res.setHeader('cache-control', 'public, max-age=60');
      res.writeHead(200, ['cache-control', 'no-store']);
      res.end('ok');
    });
    const url = await serve(app);
    expect(await raw(`${url}/string`, randomUUID())).toBe('201 Order Created');
    expect(await raw(`${url}/twice`, randomUUID())).toBe('200 OK');
    expect(errors).toEqual(['ERR_HTTP_HEADERS_SENT']);
    const key = randomUUID();
    expect(await raw(`${url}/array`, key)).toBe('200 OK no-store');
    expect(await raw(`${url}/invalid`, randomUUID())).toBe('500 Internal Server Error');
    expect(leaked).toEqual([false]);
    expect(await raw(`${url}/array`, key)).toBe('200 OK no-store');
  });
});

describe('express binding: request context and mounting', () => {
  it('the factory is synchronous and rejects bad options at once, naming them', () => {
    expect(() => idempotency({} as ExpressIdempotencyOptions)).toThrow(expect.objectContaining({ code: 'ERR_IDEMKIT_STORE_MISSING' }));
    expect(() => idempotency({ store: createMemoryStore(), ttlMs: -1 })).toThrow(/ttlMs/);
    expect(typeof idempotency({ store: createMemoryStore(), onProblem: () => undefined })).toBe('function');
  });

  // Both are factories. Passed uncalled, Express calls them as middleware: idempotency with the
  // request (every request failed with "Missing required option `store`", which says nothing of
  // why), idempotencyErrorHandler (no arguments, so a plain middleware) never called next(): every
  // request hung.
  it.each([
    ['idempotency', (app: Express) => app.use(idempotency as unknown as RequestHandler)],
    ['idempotencyErrorHandler', (app: Express) => app.use(idempotencyErrorHandler as unknown as RequestHandler)],
  ])('app.use(%s), the factory uncalled: each request fails at once with an error that says so', async (name, mount) => {
    const errors: unknown[] = [];
    const app = express();
    app.use(express.json());
    mount(app);
    app.post('/x', (_req, res) => void res.status(201).json({ ran: true }));
    app.use(((error, _req, res, _next) => {
      errors.push(error);
      res.status(500).end();
    }) as ErrorRequestHandler);
    const url = await serve(app);
    const res = await fetch(`${url}/x`, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': randomUUID() }, body: '{}', signal: AbortSignal.timeout(5_000) });
    expect(res.status).toBe(500);
    expect(errors).toHaveLength(1);
    expect(errors[0]).toBeInstanceOf(ConfigurationError);
    expect((errors[0] as Error).message).toContain(`app.use(${name}(`);
  });

  it('req.idempotency and res.locals.idempotency hold the running key; null when not covered', async () => {
    const { app } = appWith();
    const seen: Array<IdempotencyContext | null | undefined> = [];
    const echo = (req: Request, res: Response): void => {
      seen.push(res.locals['idempotency'] as IdempotencyContext | null);
      res.json({ ctx: req.idempotency ?? 'absent' });
    };
    app.post('/ctx', echo);
    app.get('/ctx', echo);
    const url = await serve(app);
    const key = randomUUID();
    const covered = await post(`${url}/ctx`, key);
    expect(JSON.parse(new TextDecoder().decode(covered.body))).toEqual({ ctx: { key, tookOver: false } });
    const get = await fetch(`${url}/ctx`);
    expect(await get.json()).toEqual({ ctx: 'absent' });
    expect(seen).toEqual([{ key, tookOver: false, transaction: undefined }, null]);
  });

  it('mounted app-wide and per route: one lease, the handler runs once, the replay comes from the first', async () => {
    const store = createMemoryStore();
    const app = express();
    app.use(express.json());
    app.use(idempotency({ store, logger: false }));
    let runs = 0;
    app.post('/x', idempotency({ store, logger: false }), (_req, res) => void res.status(201).json({ run: ++runs }));
    const url = await serve(app);
    const key = randomUUID();
    const first = await post(`${url}/x`, key);
    const replay = await post(`${url}/x`, key);
    expect(first.status).toBe(201);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(replay.body).toEqual(first.body);
    expect(runs).toBe(1);
  });

  it('an app-wide instance that let the request through leaves a per-route one to decide', async () => {
    // App-wide: keys optional. Per route: PUT covered, and a payment route that needs a key.
    const store = createMemoryStore();
    const app = express();
    app.use(express.json());
    app.use(idempotency({ store, logger: false, required: false }));
    let puts = 0;
    app.put('/profile', idempotency({ store, logger: false, methods: ['PUT'] }), (_req, res) => void res.json({ put: ++puts }));
    app.post('/payments', idempotency({ store, logger: false, required: true }), (_req, res) => void res.sendStatus(201));
    const url = await serve(app);
    const key = randomUUID();
    const put = (k: string) => fetch(`${url}/profile`, { method: 'PUT', headers: { 'idempotency-key': k } });
    expect(await (await put(key)).json()).toEqual({ put: 1 });
    const replay = await put(key);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(await replay.json()).toEqual({ put: 1 });
    expect(puts).toBe(1);
    expect((await post(`${url}/payments`, undefined)).status).toBe(400);
  });

  it('no body parser is needed when nothing reads the body (fingerprint: false, bodyField: false)', async () => {
    const app = express();
    app.use(idempotency({ store: createMemoryStore(), logger: false, fingerprint: false, bodyField: false }));
    let runs = 0;
    app.post('/x', (_req, res) => void res.status(201).json({ run: ++runs }));
    const url = await serve(app);
    const key = randomUUID();
    const init = { body: 'raw bytes', headers: { 'content-type': 'application/x-custom' } };
    expect((await post(`${url}/x`, key, init)).status).toBe(201);
    const replay = await post(`${url}/x`, key, init);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(runs).toBe(1);
  });

  it('a handler that throws after res.json(): the client gets that answer intact, not the error handler\'s', async () => {
    // The answer waits for the store; an error handler running meanwhile sees headersSent false
    // and answers 500 over it. The store's complete waits until it has, to make that certain.
    let errorHandled!: () => void;
    const handled = new Promise<void>((resolve) => (errorHandled = resolve));
    const inner = createMemoryStore();
    const store: IdempotencyStore = {
      shared: false,
      begin: (k, fp, ms) => inner.begin(k, fp, ms),
      complete: async (k, token, response, ttl) => {
        await handled;
        return inner.complete(k, token, response, ttl);
      },
      release: (k, token) => inner.release(k, token),
      renew: (k, token, ms) => inner.renew(k, token, ms),
      get: (k) => inner.get(k),
      purgeExpired: (limit) => inner.purgeExpired(limit),
      close: () => inner.close(),
    };
    const app = express();
    app.use(express.json());
    app.use(idempotency({ store, logger: false }));
    app.post('/x', async (_req, res) => {
      res.status(202).json({ accepted: true });
      throw new Error('after the answer');
    });
    app.use(((_err, _req, res, _next) => {
      // Every way an error handler answers: Express's send, and Node's writeHead, write and end.
      if (!res.headersSent) res.status(500).type('html').send('<p>Internal Server Error</p>');
      if (!res.headersSent) {
        res.writeHead(500, { 'content-type': 'text/html', 'content-length': 28 });
        res.write('<p>Internal ');
        res.end('Server Error</p>');
      }
      errorHandled();
    }) as ErrorRequestHandler);
    const url = await serve(app);
    const key = randomUUID();
    const first = await post(`${url}/x`, key);
    expect(first.status).toBe(202);
    expect(first.headers.get('content-type')).toBe('application/json; charset=utf-8');
    expect(new TextDecoder().decode(first.body)).toBe('{"accepted":true}');
    const replay = await post(`${url}/x`, key);
    expect(replay.status).toBe(202);
    expect(replay.body).toEqual(first.body);
  });

  it('a write after res.json() fails as Node fails one (false, the callback gets the error) and changes nothing', async () => {
    const { app } = appWith();
    let returned: boolean | undefined;
    let callbackError: (Error & { code?: string }) | null | undefined;
    app.post('/x', (_req, res) => {
      res.status(201).json({ ok: true });
      returned = res.write('more', (error) => (callbackError = error));
    });
    const url = await serve(app);
    const reply = await post(`${url}/x`, randomUUID());
    expect(reply.status).toBe(201);
    expect(new TextDecoder().decode(reply.body)).toBe('{"ok":true}');
    expect(returned).toBe(false);
    await vi.waitFor(() => expect(callbackError?.code).toBe('ERR_STREAM_WRITE_AFTER_END'), { timeout: 10_000 });
  });

  it('per-route only: other routes are untouched', async () => {
    const store = createMemoryStore();
    const app = express();
    app.use(express.json());
    app.post('/guarded', idempotency({ store, logger: false }), (_req, res) => void res.sendStatus(201));
    app.post('/open', (_req, res) => void res.sendStatus(201));
    const url = await serve(app);
    expect((await post(`${url}/guarded`, undefined)).status).toBe(400);
    expect((await post(`${url}/open`, undefined)).status).toBe(201);
  });

  it('client gone while the handler runs → the key stays held; the answer is stored and the retry replays it', async () => {
    const { app, runs, store } = appWith();
    let answer: (() => void) | undefined;
    app.post('/slow', (_req, res) => {
      answer = () => void res.status(201).json({ done: true });
    });
    const url = await serve(app);
    const key = randomUUID();
    const abort = new AbortController();
    const pending = post(`${url}/slow`, key, { signal: abort.signal }).catch((error: unknown) => error);
    await vi.waitFor(() => expect(runs()).toBe(1), { timeout: 10_000 });
    abort.abort();
    expect(await pending).toBeInstanceOf(Error);
    // Still running: a retry must not run the operation a second time.
    const during = await post(`${url}/slow`, key);
    expect(during.status).toBe(409);
    expect((await store.get(scopedKey(undefined, key)))?.state).toBe('in_progress');
    answer?.();
    await vi.waitFor(async () => expect((await store.get(scopedKey(undefined, key)))?.state).toBe('completed'), { timeout: 10_000 });
    const retry = await post(`${url}/slow`, key);
    expect(retry.status).toBe(201);
    expect(retry.headers.get('idempotent-replayed')).toBe('true');
    expect(JSON.parse(new TextDecoder().decode(retry.body))).toEqual({ done: true });
    expect(runs()).toBe(1);
  });
});

// Was: the key was claimed for every POST, and Express's own 404 for a path no route matches was
// stored for the TTL, so the retry on an instance with the route (a rolling deploy) or to the
// corrected path got that 404 replayed, or a 422.
describe('express binding: an answer no route gave', () => {
  it("Express's own 404 is not stored: the retry to the path that exists runs once", async () => {
    const { app, store } = appWith();
    let runs = 0;
    app.post('/pay', (_req, res) => void res.status(201).json({ run: ++runs }));
    const url = await serve(app);
    const key = randomUUID();
    const typo = await post(`${url}/paymnts`, key, { body: '{"cents":100}', headers: { 'content-type': 'application/json' } });
    expect(typo.status).toBe(404);
    expect(store.size).toBe(0);
    const fixed = await post(`${url}/pay`, key, { body: '{"cents":100}', headers: { 'content-type': 'application/json' } });
    expect(fixed.status).toBe(201);
    expect(fixed.headers.get('idempotent-replayed')).toBeNull();
    const again = await post(`${url}/pay`, key, { body: '{"cents":100}', headers: { 'content-type': 'application/json' } });
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect(runs).toBe(1);
  });

  it("a catch-all middleware's 404 is not stored either, but a route's own 404 and a middleware's 201 are", async () => {
    const { app } = appWith();
    let runs = 0;
    app.post('/orders/:id', (_req, res) => void res.status(404).json({ run: ++runs, error: 'no such order' }));
    app.use('/legacy', (_req, res) => void res.status(201).json({ run: ++runs }));
    app.use((_req, res) => void res.status(404).json({ error: 'not found' }));
    const url = await serve(app);
    const [routed, legacy, nowhere] = [randomUUID(), randomUUID(), randomUUID()];
    expect((await post(`${url}/orders/7`, routed)).status).toBe(404);
    expect((await post(`${url}/orders/7`, routed)).headers.get('idempotent-replayed')).toBe('true');
    expect((await post(`${url}/legacy`, legacy)).status).toBe(201);
    expect((await post(`${url}/legacy`, legacy)).headers.get('idempotent-replayed')).toBe('true');
    expect((await post(`${url}/nowhere`, nowhere)).status).toBe(404);
    expect((await post(`${url}/nowhere`, nowhere)).headers.get('idempotent-replayed')).toBeNull();
    expect(runs).toBe(2);
  });

  it("a streamed catch-all 404, and Express's own 404 after a route that only passed the request on, are not stored either", async () => {
    const { app, store } = appWith();
    let runs = 0;
    app.all('/{*any}', (_req, _res, next) => next()); // app.all('*', requireAuth): a route, so req.route is set
    app.post('/pay', (_req, res) => void res.status(201).json({ run: ++runs }));
    const url = await serve(app);
    const key = randomUUID();
    expect((await post(`${url}/paymnts`, key)).status).toBe(404);
    expect(store.size).toBe(0);
    expect((await post(`${url}/pay`, key)).status).toBe(201);

    const streamed = appWith();
    streamed.app.use((_req, res) => {
      res.status(404).type('html');
      res.write('<p>not ');
      res.end('found</p>');
    });
    const streamedUrl = await serve(streamed.app);
    const other = randomUUID();
    expect((await post(`${streamedUrl}/paymnts`, other)).status).toBe(404);
    expect(streamed.store.size).toBe(0);
    expect(runs).toBe(1);
  });

  it("a route's 404 through next(err), or as an HTML page under a global default-src 'none', is stored", async () => {
    const { app } = appWith();
    let runs = 0;
    app.use((_req, res, next) => {
      res.setHeader('content-security-policy', "default-src 'none'"); // helmet-like, on every answer
      next();
    });
    app.post('/orders/:id', (_req, _res, next) => {
      runs++;
      next(Object.assign(new Error('no such order'), { status: 404 })); // Express's final handler renders it
    });
    app.post('/pages/:id', (_req, res) => void (runs++, res.status(404).type('html').send('<pre>no such page</pre>')));
    const url = await serve(app);
    for (const path of ['/orders/7', '/pages/7']) {
      const key = randomUUID();
      expect((await post(`${url}${path}`, key)).status).toBe(404);
      expect((await post(`${url}${path}`, key)).headers.get('idempotent-replayed')).toBe('true');
    }
    expect(runs).toBe(2);
  });
});

// Was: the handler ran behind the timeout's 503 (or, after connect-timeout's next(err), did not),
// and the key answered 409 for a whole lease (60 s by default) before a retry could run it.
describe('express binding: a timeout middleware mounted before idempotency() answers while the key is being claimed', () => {
  it.each([
    ["next(err), as connect-timeout does", (_res: Response, next: (err?: unknown) => void) => next(Object.assign(new Error('Response timeout'), { status: 503 }))],
    ['answering itself', (res: Response) => void res.status(503).json({ error: 'timeout' })],
  ] as const)('%s: the handler does not run behind it, and the retry runs it at once', async (_name, answer) => {
    const store = new SlowBeginStore();
    store.delayMs = 400; // the timeout answers at 100 ms
    let requests = 0;
    let runs = 0;
    const app = express();
    app.use((_req, res, next) => {
      // Only the first request times out.
      const timer = setTimeout(() => answer(res, next), requests++ === 0 ? 100 : 10_000);
      res.once('close', () => clearTimeout(timer));
      next();
    });
    app.use(express.json());
    app.use(idempotency({ store, logger: false }));
    app.post('/pay', (_req, res) => void res.status(201).json({ run: ++runs }));
    app.use(((error: { status?: number; message: string }, _req, res, next) => {
      if (res.headersSent) return next(error);
      res.status(error.status ?? 500).json({ error: error.message });
    }) as ErrorRequestHandler);
    const url = await serve(app);
    const key = randomUUID();
    expect((await post(`${url}/pay`, key)).status).toBe(503);
    store.delayMs = 0;
    // 409 until the claim's answer came back; then the key is free again, not held for a lease.
    await vi.waitFor(async () => expect((await post(`${url}/pay`, key)).status).toBe(201), { timeout: 5_000, interval: 100 });
    expect(runs).toBe(1);
  });
});

describe('express binding: a timeout middleware mounted before idempotency() answers while the store is asked for a replay or a problem', () => {
  it('the client gets the timeout answer and the error handlers get nothing (was ERR_HTTP_HEADERS_SENT from the replay or problem written over it)', async () => {
    // Counts the lookups that came back, so the test waits for them, not for a guessed time.
    const store = new (class extends SlowBeginStore {
      answered = 0;
      override async begin(...args: Parameters<SlowBeginStore['begin']>): ReturnType<SlowBeginStore['begin']> {
        try {
          return await super.begin(...args);
        } finally {
          this.answered++;
        }
      }
    })();
    let timesOut = false;
    const errors: unknown[] = [];
    let runs = 0;
    const app = express();
    app.use((_req, res, next) => {
      if (timesOut) {
        const timer = setTimeout(() => void res.status(503).json({ error: 'timeout' }), 100);
        res.once('close', () => clearTimeout(timer));
      }
      next();
    });
    app.use(express.json());
    app.use(idempotency({ store, logger: false }));
    app.post('/pay', (_req, res) => void res.status(201).json({ run: ++runs }));
    app.use(((error, _req, res, next) => {
      errors.push(error);
      if (res.headersSent) return next(error);
      res.status(500).json({ error: 'failed' });
    }) as ErrorRequestHandler);
    const url = await serve(app);
    const key = randomUUID();
    const pay = (body: string): Promise<Fetched> => post(`${url}/pay`, key, { headers: { 'content-type': 'application/json' }, body });
    expect((await pay('{"a":1}')).status).toBe(201);
    timesOut = true;
    store.delayMs = 400; // the timeout answers at 100 ms
    // The stored answer (a replay), then another body under the key (a 422 problem).
    for (const body of ['{"a":1}', '{"a":2}']) {
      const answer = await pay(body);
      expect(answer.status).toBe(503);
      expect(new TextDecoder().decode(answer.body)).toBe('{"error":"timeout"}');
    }
    // Until the slow lookups have come back and their answers were dealt with.
    await vi.waitFor(() => expect(store.answered).toBe(3), { timeout: 5_000 });
    await new Promise((resolve) => setImmediate(resolve));
    expect(errors).toEqual([]);
    expect(runs).toBe(1);
  });
});

// Was: connect-timeout's 503 (not storable) freed the key while the handler still ran, so the
// client's retry ran the operation a second time beside the first.
describe('express binding: connect-timeout answers while the handler still runs', () => {
  it.each([
    ['with idempotencyErrorHandler()', true],
    ['without it', false],
  ] as const)('%s: the key is kept, and the retry gets 410 cut-short, never a second run', async (_name, withErrorHandler) => {
    let runs = 0;
    let finished = false;
    const app = express();
    app.use(timeout('100ms'));
    app.use(express.json());
    app.use(idempotency({ store: createMemoryStore(), logger: false }));
    app.post('/pay', async (req, res) => {
      runs++;
      await new Promise((resolve) => setTimeout(resolve, 400)); // the charge, slower than the timeout
      finished = true;
      if (!req.timedout) res.status(201).json({ charged: runs });
    });
    if (withErrorHandler) app.use(idempotencyErrorHandler());
    const url = await serve(app);
    const key = randomUUID();
    expect((await post(`${url}/pay`, key)).status).toBe(503);
    const retry = await post(`${url}/pay`, key);
    expect(retry.status).toBe(410);
    expect(JSON.parse(new TextDecoder().decode(retry.body))).toMatchObject({ reason: 'cut-short', originalStatus: null });
    await vi.waitFor(() => expect(finished).toBe(true));
    expect((await post(`${url}/pay`, key)).status).toBe(410);
    expect(runs).toBe(1);
  });
});

/** connect-timeout (100 ms) before idempotency(), then a slow POST /pay told its run number, then `after` (error handlers). */
async function timedApp(
  respond: boolean,
  pay: (req: Request, res: Response, next: NextFunction, run: number) => Promise<unknown>,
  after: ErrorRequestHandler[] = [],
): Promise<{ url: string; runs: () => number }> {
  let runs = 0;
  const app = express();
  app.use(timeout('100ms', { respond }));
  app.use(idempotency({ store: createMemoryStore(), logger: false }));
  app.post('/pay', (req, res, next) => pay(req, res, next, ++runs));
  for (const handler of after) app.use(handler);
  return { url: `${await serve(app)}/pay`, runs: () => runs };
}

const slow = (ms: number): Promise<unknown> => new Promise((resolve) => setTimeout(resolve, ms));

describe("express binding: connect-timeout's mark on answers that are the handler's own", () => {
  it('respond: false, the handler answers 201 after the deadline: stored and replayed', async () => {
    const { url, runs } = await timedApp(false, async (_req, res, _next, run) => (await slow(300), res.status(201).json({ charged: run })), [idempotencyErrorHandler()]);
    const key = randomUUID();
    expect((await post(url, key)).status).toBe(201);
    const retry = await post(url, key);
    expect([retry.status, retry.headers.get('idempotent-replayed')]).toEqual([201, 'true']);
    expect(runs()).toBe(1);
  });

  it('respond: false, the handler fails after the deadline: idempotencyErrorHandler() frees the key as for any throw', async () => {
    const { url, runs } = await timedApp(
      false,
      async (_req, res, next, run) => (await slow(300), run === 1 ? next(new Error('declined upstream, nothing charged')) : res.status(201).json({ charged: run })),
      [idempotencyErrorHandler()],
    );
    const key = randomUUID();
    expect((await post(url, key)).status).toBe(500);
    expect((await post(url, key)).status).toBe(201);
    expect(runs()).toBe(2);
  });

  it('respond: false, the handler answers its own 500 after the deadline: the key is freed as for any unstorable answer', async () => {
    const { url, runs } = await timedApp(false, async (_req, res, _next, run) => {
      await slow(250);
      return run === 1 ? res.status(500).json({ error: 'upstream down, nothing charged' }) : res.status(201).json({ charged: run });
    });
    const key = randomUUID();
    expect((await post(url, key)).status).toBe(500);
    expect((await post(url, key)).status).toBe(201);
    expect(runs()).toBe(2);
  });

  it("respond: true, an error handler that answers connect-timeout's error with a storable 202: not stored, 410 cut-short, never run again", async () => {
    const processing: ErrorRequestHandler = (_error, _req, res, _next) => void res.status(202).json({ status: 'processing, retry later' });
    const { url, runs } = await timedApp(true, async (req, res, _next, run) => (await slow(300), req.timedout ? undefined : res.status(201).json({ charged: run })), [
      idempotencyErrorHandler(),
      processing,
    ]);
    const key = randomUUID();
    expect((await post(url, key)).status).toBe(202);
    const retry = await post(url, key);
    expect(retry.status).toBe(410);
    expect(JSON.parse(new TextDecoder().decode(retry.body))).toMatchObject({ reason: 'cut-short' });
    expect(runs()).toBe(1);
  });

  it('onProblem that answers and then calls next(): its answer stands, nothing is thrown after it', async () => {
    const errors: unknown[] = [];
    const { app } = appWith({ onProblem: (_error, _req, res, next) => (res.status(400).json({ mine: true }), next()) });
    app.post('/x', (_req, res) => void res.sendStatus(201));
    app.use(((error, _req, _res, next) => (errors.push(error), next(error))) as ErrorRequestHandler);
    const url = await serve(app);
    const reply = await post(`${url}/x`, undefined);
    expect(reply.status).toBe(400);
    expect(JSON.parse(new TextDecoder().decode(reply.body))).toEqual({ mine: true });
    expect(errors).toEqual([]);
  });
});
