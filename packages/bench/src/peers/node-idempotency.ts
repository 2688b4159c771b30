// @node-idempotency/core wired into Express and Fastify. Its own framework plugins
// (@node-idempotency/express, /fastify) are not on the registry this project installs from, so
// this is the glue their READMEs describe and their plugins do: `onRequest` before the handler
// (a replay, a 409 or a 422 comes back from it), `onResponse` with the handler's answer after.
import { Idempotency, IdempotencyError, IdempotencyErrorCodes, type IdempotencyParams, type IdempotencyResponse } from '@node-idempotency/core';
import type { StorageAdapter } from '@node-idempotency/storage';
import { MemoryStorageAdapter } from '@node-idempotency/storage-adapter-memory';
import type { NextFunction, Request, RequestHandler, Response } from 'express';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { BENCH_TTL_MS, type ServiceEnv, type StoreName } from '../config.js';

export interface NodeIdempotencySetup {
  readonly idempotency: Idempotency;
  roundTrips(): number;
  close(): Promise<void>;
}

const keyPrefix = (runId: string): string => `node-idem-bench:${runId}`;

/** The storage key @node-idempotency/core keeps a request under (its `getIdempotencyCacheKey`). */
export function nodeIdempotencyStorageKey(runId: string, method: string, path: string, key: string): string {
  return `${keyPrefix(runId)}:${method}:${path}:${key}`;
}

/** The storage adapter the way its README sets it up; each adapter call is one Redis command. */
export async function nodeIdempotency(store: StoreName, env: ServiceEnv, runId: string): Promise<NodeIdempotencySetup> {
  let adapter: StorageAdapter;
  let close = async (): Promise<void> => undefined;
  if (store === 'memory') {
    adapter = new MemoryStorageAdapter();
  } else if (store === 'redis') {
    if (!env.redis) throw new Error('TEST_REDIS_URL is not set');
    const { RedisStorageAdapter } = await import('@node-idempotency/storage-adapter-redis');
    const redis = new RedisStorageAdapter({ url: env.redis });
    await redis.connect();
    adapter = redis;
    const url = env.redis;
    close = async () => {
      await redis.disconnect();
      // Its records carry a TTL, but a shared Redis should not keep a run's keys for 10 minutes.
      const [{ Redis }, { deleteRedisPrefix }] = await Promise.all([import('ioredis'), import('../stores.js')]);
      const client = new Redis(url);
      try {
        await deleteRedisPrefix(client, `${keyPrefix(runId)}:`);
      } finally {
        await client.quit();
      }
    };
  } else {
    throw new Error(`@node-idempotency has no ${store} adapter in this bench`);
  }
  let calls = 0;
  const counted: StorageAdapter = {
    setIfNotExists: (...args) => (calls++, adapter.setIfNotExists(...args)),
    set: (...args) => (calls++, adapter.set(...args)),
    get: (...args) => (calls++, adapter.get(...args)),
  };
  const idempotency = new Idempotency(counted, { cacheTTLMS: BENCH_TTL_MS, cacheKeyPrefix: keyPrefix(runId) });
  return { idempotency, roundTrips: () => (store === 'memory' ? 0 : calls), close };
}

function statusOf(error: IdempotencyError): number {
  switch (error.code) {
    case IdempotencyErrorCodes.REQUEST_IN_PROGRESS:
      return 409;
    case IdempotencyErrorCodes.IDEMPOTENCY_FINGERPRINT_MISSMATCH:
      return 422;
    default:
      return 400;
  }
}

function replayStatus(response: IdempotencyResponse): number {
  const status = response.additional?.['statusCode'];
  return typeof status === 'number' ? status : 200;
}

function toParams(req: { headers: Record<string, unknown>; body: unknown; url: string; method: string }): IdempotencyParams {
  return { headers: req.headers, body: req.body as Record<string, unknown>, path: req.url, method: req.method };
}

export function nodeIdempotencyExpress(idempotency: Idempotency): RequestHandler {
  return async (req: Request, res: Response, next: NextFunction) => {
    const params = toParams(req);
    let cached: IdempotencyResponse | undefined;
    try {
      cached = await idempotency.onRequest(params);
    } catch (error) {
      if (!(error instanceof IdempotencyError)) return next(error);
      if (error.code === IdempotencyErrorCodes.REQUEST_IN_PROGRESS) res.setHeader('retry-after', '1');
      res.status(statusOf(error)).json({ message: error.message });
      return;
    }
    if (cached) {
      res.status(replayStatus(cached)).setHeader('idempotent-replayed', 'true');
      res.json(cached.body ?? cached.error);
      return;
    }
    // First request: store what the handler sends (JSON parsed back, as their plugin does).
    const send = res.send.bind(res);
    res.send = (body?: unknown) => {
      const status = res.statusCode;
      let payload = body;
      if (typeof body === 'string' && String(res.getHeader('content-type')).includes('application/json')) payload = JSON.parse(body);
      const stored: IdempotencyResponse = { additional: { statusCode: status }, ...(status < 400 ? { body: payload } : { error: payload }) };
      void idempotency.onResponse(params, stored);
      return send(body);
    };
    next();
  };
}

export function nodeIdempotencyFastify(app: FastifyInstance, idempotency: Idempotency): void {
  app.addHook('preHandler', async (request: FastifyRequest, reply: FastifyReply) => {
    try {
      const cached = await idempotency.onRequest(toParams(request));
      if (cached) {
        return reply.code(replayStatus(cached)).header('idempotent-replayed', 'true').send(cached.body ?? cached.error);
      }
    } catch (error) {
      if (!(error instanceof IdempotencyError)) throw error;
      if (error.code === IdempotencyErrorCodes.REQUEST_IN_PROGRESS) void reply.header('retry-after', '1');
      return reply.code(statusOf(error)).send({ message: error.message });
    }
    return undefined;
  });
  // As their plugin does: every response that goes out (replays included) is written back.
  app.addHook('onSend', async (request: FastifyRequest, reply: FastifyReply, payload: unknown) => {
    const status = reply.statusCode;
    const stored: IdempotencyResponse = { additional: { statusCode: status }, ...(status < 400 ? { body: payload } : { error: payload }) };
    await idempotency.onResponse(toParams(request), stored);
    return payload;
  });
}
