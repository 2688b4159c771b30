import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import type { StartApp, StartAppInput, TestAppHandle } from '@idemkit/http-suite';
import express, { type Express, type NextFunction, type Request, type Response } from 'express';
import { afterEach } from 'vitest';
import { idempotency, idempotencyErrorHandler, type ExpressIdempotencyOptions } from '../src/index.js';

/** The express module (5, or 4 through the `express4` alias): the app is the same for both. */
export type ExpressModule = typeof express;

type AsyncHandler = (req: Request, res: Response) => Promise<void> | void;
/** Express 4 ignores rejected promises; route them to next(err) so both majors behave alike. */
const route = (fn: AsyncHandler) => (req: Request, res: Response, next: NextFunction) => {
  Promise.resolve()
    .then(() => fn(req, res))
    .catch(next);
};

function count(input: StartAppInput, name: string): number {
  const n = (input.counter.get(name) ?? 0) + 1;
  input.counter.set(name, n);
  return n;
}

/** The routes of `@idemkit/http-suite`'s contract, idempotency applied app-wide. */
export function buildApp(input: StartAppInput, expressModule: ExpressModule = express, extra: Partial<ExpressIdempotencyOptions> = {}): Express {
  const app = expressModule();
  app.use((req, res, next) => {
    // Set per request before idempotency, as a request-id middleware does.
    // And a CORS header on the transactional route: kept on a rolled-back answer's 503.
    if (req.method === 'POST' && req.path === '/tx') res.setHeader('access-control-allow-origin', 'https://shop.example');
    if (req.method === 'POST' && req.path === '/orders') {
      const n = String(count(input, 'orders:arrived'));
      res.setHeader('x-arrival', n);
      if (req.headers['x-outer-cookie'] !== undefined) res.append('Set-Cookie', `arrival=${n}`);
    }
    next();
  });
  app.use(expressModule.json());
  app.use(expressModule.text());
  app.use(expressModule.raw());
  app.use(
    idempotency({
      ...input.options,
      store: input.store,
      scope: (req) => req.get('x-user'),
      ...(input.keyFrom === undefined ? {} : { getKey: (req: Request) => req.get(input.keyFrom!) }),
      ...extra,
    }),
  );

  app.post(
    '/orders',
    route(async (req, res) => {
      const n = count(input, 'orders');
      const delay = Number(req.query['delay'] ?? 0);
      if (delay > 0) await new Promise((resolve) => setTimeout(resolve, delay));
      if (typeof req.query['hold'] === 'string') await input.hold(req.query['hold']);
      const id = randomUUID();
      res.location(`/orders/${id}`);
      res.set('X-Custom', 'yes');
      res.append('Set-Cookie', 'a=1');
      res.append('Set-Cookie', 'b=2');
      if (req.query['hop'] === '1') res.set({ Connection: 'close, X-Hop', 'X-Hop': '1' });
      res.status(req.query['status'] ? Number(req.query['status']) : 201).json({ id, n, body: req.body as unknown });
    }),
  );
  app.patch(
    '/orders/:id',
    route((req, res) => {
      res.json({ id: req.params['id'], n: count(input, 'patch'), body: req.body as unknown });
    }),
  );
  app.get(
    '/orders',
    route((_req, res) => {
      res.json({ n: count(input, 'list') });
    }),
  );
  app.post(
    '/binary',
    route((_req, res) => {
      count(input, 'binary');
      res.type('application/octet-stream').send(Buffer.from(Array.from({ length: 256 }, (_, i) => i)));
    }),
  );
  app.post(
    '/text',
    route((req, res) => {
      count(input, 'text');
      res.type('text/plain').send(String(req.body));
    }),
  );
  app.post(
    '/throw',
    route((req) => {
      count(input, 'throw');
      throw thrownError(req.query['status']);
    }),
  );
  app.post(
    '/stream',
    route((_req, res) => {
      count(input, 'stream');
      res.type('text/plain');
      Readable.from(['a', 'b', 'c']).pipe(res);
    }),
  );
  app.post(
    '/large',
    route((req, res) => {
      count(input, 'large');
      res.type('application/octet-stream').send(Buffer.alloc(Number(req.query['size']), 0x61));
    }),
  );
  app.post(
    '/tx',
    route(async (req, res) => {
      count(input, 'tx');
      if (!input.txWork) throw new Error('POST /tx needs txWork');
      res.status(201).json(await input.txWork(req.idempotency?.transaction, req.body));
    }),
  );
  app.post(
    '/create',
    route((req, res) => {
      count(input, 'create');
      res.status(201).json({ id: randomUUID(), data: (req.body as { data?: unknown }).data });
    }),
  );
  // As the README asks: without it Express tells idempotency() nothing of a thrown error, and the
  // 4xx Express renders for one (the suite's `/throw?status=400`) would be stored.
  app.use(idempotencyErrorHandler());
  return app;
}

/** `new Error('boom')`, or with `?status=<code>` an http-errors style error the framework answers with that code. */
function thrownError(status: unknown): Error {
  const error = new Error('boom');
  return typeof status === 'string' ? Object.assign(error, { status: Number(status), statusCode: Number(status), expose: true }) : error;
}

/** Listen on 127.0.0.1, port 0; close() also drops keep-alive sockets so tests end promptly. */
export async function listen(app: Express): Promise<TestAppHandle> {
  const server = app.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    close: async () => {
      const closed = new Promise<void>((resolve, reject) => server.close((error) => (error ? reject(error) : resolve())));
      server.closeAllConnections();
      await closed;
    },
  };
}

export const startApp: StartApp = (input) => listen(buildApp(input));

/**
 * `serve(app)` for a test file: listens on a free loopback port and gives the URL; every server
 * the file started is closed after each test.
 */
export function serving(): (app: Express) => Promise<string> {
  const open: Array<() => Promise<void>> = [];
  afterEach(async () => {
    await Promise.all(open.splice(0).map((close) => close()));
  });
  return async (app) => {
    const handle = await listen(app);
    open.push(handle.close);
    return handle.url;
  };
}
