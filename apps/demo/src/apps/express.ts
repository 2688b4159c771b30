import { idempotency, idempotencyErrorHandler } from '@idemkit/express';
import express, { type ErrorRequestHandler, type Response } from 'express';
import type { Assets } from '../assets.js';
import type { Backend } from '../backend.js';
import { clientError, createThing, forbiddenProperty, getOrder, invalidJson, listOrders, placeOrder, problem, tooLarge, type DemoResponse } from '../checkout.js';
import type { DemoConfig } from '../config.js';
import type { RunningDemo } from '../server.js';
import { listen } from './listen.js';

function send(res: Response, r: DemoResponse): void {
  res.status(r.status).set(r.headers);
  if (r.headers['content-type']) res.send(Buffer.from(JSON.stringify(r.body)));
  else res.json(r.body);
}

export async function startExpress(config: DemoConfig, backend: Backend, assets: Assets): Promise<RunningDemo> {
  const app = express();
  app.use(express.json({ limit: '100kb' }));
  // A `__proto__` key refused as Fastify's and Koa's parsers refuse it (see forbiddenProperty).
  app.use((req, res, next) => {
    const why = forbiddenProperty(req.body);
    if (why === undefined) next();
    else send(res, invalidJson(why));
  });
  const guard = idempotency({ store: backend.store, transactional: backend.transactional });

  app.get('/', (_req, res) => void res.type('html').send(assets.page));
  app.get('/vendor/idemkit-client.js', (_req, res) => void res.type('text/javascript').send(assets.client));
  app.get('/orders', async (_req, res) => send(res, await listOrders(backend)));
  app.get('/orders/:id', async (req, res) => send(res, await getOrder(backend, req.params.id)));
  app.post('/orders', guard, async (req, res) => send(res, await placeOrder(backend, config.workMs, req.body, req.idempotency)));
  app.post('/create', guard, async (req, res) => send(res, await createThing(backend, req.body, req.idempotency)));

  // Frees the key of a handler that threw (and, in transactional mode, rolls its writes back).
  app.use(idempotencyErrorHandler());
  const onError: ErrorRequestHandler = (err: { type?: string; message?: string; status?: number; expose?: boolean }, _req, res, _next) => {
    if (err.type === 'entity.parse.failed') return send(res, invalidJson(err.message ?? 'Malformed JSON.'));
    if (err.type === 'entity.too.large') return send(res, tooLarge());
    if (err.status !== undefined && err.status >= 400 && err.status < 500 && err.expose === true) return send(res, clientError(err.status, err.message ?? ''));
    console.error(err);
    send(res, problem(500, 'internal', 'Internal error', 'Something went wrong; retry with the same key.'));
  };
  app.use(onError);

  return listen(app, config);
}
