import { idempotency, idempotencyErrorHandler } from '@idemkit/express';
import type { RequestListener } from 'node:http';
import express, { type ErrorRequestHandler, type Request } from 'express';
import { getSharedIdempotencyService, idempotency as expressIdempotency } from 'express-idempotency';
import { nodeIdempotencyExpress } from '../peers/node-idempotency.js';
import { createOrderOrHang, createOrderSlowly, type AppContext } from './context.js';
import { answerBytes } from './probes.js';

/** Express 5: body parser, then the library under test (as its README mounts it), then the routes. */
export function expressApp({ library, counters, order, stats }: AppContext): RequestListener {
  const app = express();
  app.disable('x-powered-by');
  app.use((req, _res, next) => {
    if (req.method === 'POST') counters.requests++;
    next();
  });
  app.get('/__stats', (_req, res) => {
    res.json(stats());
  });
  app.use(express.json());
  // express-idempotency calls next() on a replay too; its README has the handler ask isHit().
  let isHit = (_req: Request): boolean => false;
  switch (library.kind) {
    case 'idemkit':
      app.use(idempotency({ store: library.store, ttlMs: library.ttlMs, leaseMs: library.leaseMs, storeTimeoutMs: library.storeTimeoutMs, localCache: library.localCache }));
      break;
    case 'express-idempotency': {
      app.use(expressIdempotency());
      const service = getSharedIdempotencyService();
      isHit = (req) => service.isHit(req);
      break;
    }
    case 'node-idempotency':
      app.use(nodeIdempotencyExpress(library.idempotency));
      break;
    case 'probe-hook':
      app.use((_req, _res, next) => next());
      break;
    case 'probe-store': {
      const { keeper } = library;
      app.use((req, res, next) => {
        const end = res.end;
        res.end = function keepAnswer(this: typeof res, ...args: unknown[]) {
          keeper.keep(req.headers['idempotency-key'], this.statusCode, this.getHeaders(), answerBytes(args[0]));
          return Reflect.apply(end, this, args) as typeof res;
        } as typeof res.end;
        next();
      });
      break;
    }
    case 'bare':
      break;
  }
  app.post('/orders', async (req, res) => {
    if (isHit(req)) return;
    res.status(201).json(await order(req.body));
  });
  app.post('/slow', async (req, res) => {
    if (isHit(req)) return;
    res.status(201).json(await createOrderSlowly(counters, req.body));
  });
  app.post('/crash', async (req, res) => {
    if (isHit(req)) return;
    res.status(201).json(await createOrderOrHang(counters, req.headers, req.body));
  });
  if (library.kind === 'idemkit') app.use(idempotencyErrorHandler());
  // express-idempotency answers a duplicate in flight with next(error) and a 409 status set.
  const errors: ErrorRequestHandler = (error: Error, _req, res, _next) => {
    if (res.headersSent) return;
    res.status(res.statusCode >= 400 ? res.statusCode : 500).json({ message: error.message });
  };
  app.use(errors);
  return app as unknown as RequestListener;
}
