// Type-checked (never run) by consumers.test.ts under `exactOptionalPropertyTypes`: options filled
// from configuration (`process.env.X`, maybe undefined) must compile, as they work at runtime,
// where `undefined` means "the default".
import { createIdempotentFetch } from '@idemkit/client';
import { createIdempotencyEngine, createMemoryStore, idempotent, startPurger, type MaybePromise } from '@idemkit/core';
import { idempotency as expressIdempotency } from '@idemkit/express';
import { fastifyIdempotency } from '@idemkit/fastify';
import { idempotency as koaIdempotency } from '@idemkit/koa';
import { createMongoStore } from '@idemkit/mongodb';
import { createPostgresStore } from '@idemkit/postgres';
import { createRedisStore } from '@idemkit/redis';
import Fastify from 'fastify';
import type { Redis } from 'ioredis';
import type { Db } from 'mongodb';
import type pg from 'pg';

const maybe = <T>(value: T): T | undefined => (process.env.IDEMKIT_NEVER_SET === undefined ? undefined : value);
const store = createMemoryStore();
// A callback typed on its own, as apps that share one between routes write it.
const tenantOf: () => MaybePromise<string | undefined> = async () => process.env.TENANT;

export function core(): unknown {
  return createIdempotencyEngine({
    store,
    methods: maybe(['POST']),
    required: maybe(true),
    header: maybe('Idempotency-Key'),
    bodyField: maybe('idempotencyKey'),
    getKey: maybe(() => 'k'),
    validateKey: maybe(() => true),
    scope: maybe(tenantOf),
    fingerprint: maybe(() => 'fp'),
    storable: maybe(() => true),
    ttlMs: maybe(1_000),
    leaseMs: maybe(1_000),
    maxBodyBytes: maybe(1_000),
    concurrency: maybe('wait' as const),
    waitTimeoutMs: maybe(1_000),
    onStoreError: maybe('fail' as const),
    storeTimeoutMs: maybe(1_000),
    transactional: maybe(false),
    onEvent: maybe(() => undefined),
    logger: maybe(false as const),
  });
}

export function jobs(): unknown[] {
  const charge = async (id: string): Promise<string> => id;
  return [
    createMemoryStore({ maxEntries: maybe(100), now: maybe(Date.now) }),
    startPurger(store, { intervalMs: maybe(1_000), batchSize: maybe(100), onError: maybe(() => undefined) }),
    // Type arguments named explicitly, as code written before `this` was passed through names them.
    idempotent<[string], string>(charge, { store, key: (id) => id }),
    idempotent(charge, {
      store,
      key: (id) => id,
      scope: maybe(() => 'tenant'),
      name: maybe('charge'),
      fingerprint: maybe(false as const),
      serialize: maybe((r: string) => r),
      deserialize: maybe((b: Uint8Array) => new TextDecoder().decode(b)),
      concurrency: maybe('wait' as const),
      ttlMs: maybe(1_000),
    }),
  ];
}

export function bindings(): unknown[] {
  const onProblem = maybe(() => undefined);
  return [
    expressIdempotency({ store, onProblem }),
    koaIdempotency({ store, onProblem }),
    Fastify().register(fastifyIdempotency, { store, onProblem }),
  ];
}

export function stores(client: Redis, pool: pg.Pool, db: Db): unknown[] {
  return [
    createRedisStore({ client, prefix: maybe('app:'), leaseGraceMs: maybe(1_000), claim: maybe('set' as const) }),
    createPostgresStore({ pool, schema: maybe('app'), table: maybe('keys'), queryTimeoutMs: maybe(5_000) }),
    createPostgresStore({ connectionString: 'postgres://localhost/app', poolOptions: maybe({ max: 5 }) }),
    createMongoStore({ db, collectionName: maybe('keys'), clock: maybe('server' as const), clockRefreshMs: maybe(1_000), fencing: maybe('auto' as const), logger: maybe(false as const) }),
  ];
}

export function client(): Promise<Response> {
  const fetchWithRetries = createIdempotentFetch({
    fetch: maybe(globalThis.fetch),
    header: maybe('Idempotency-Key'),
    generateKey: maybe(() => 'k'),
    methods: maybe(['POST']),
    maxAttempts: maybe(3),
    baseDelayMs: maybe(100),
    maxDelayMs: maybe(1_000),
    deadlineMs: maybe(5_000),
    attemptTimeoutMs: maybe(1_000),
    retryOn: maybe(() => true),
    onAttempt: maybe(() => undefined),
    random: maybe(Math.random),
  });
  return fetchWithRetries('https://example.test/orders', { method: 'POST', idempotencyKey: maybe('k') });
}

// Every binding re-exports the same core types, so an app imports them from the one it uses.
export type FromEachBinding = [
  import('@idemkit/express').IdempotencyContext | import('@idemkit/express').IdempotencyErrorCode | import('@idemkit/express').IdempotencyEvent | import('@idemkit/express').IdempotencyStore | import('@idemkit/express').ProblemDetails,
  import('@idemkit/koa').IdempotencyContext | import('@idemkit/koa').IdempotencyErrorCode | import('@idemkit/koa').IdempotencyEvent | import('@idemkit/koa').IdempotencyStore | import('@idemkit/koa').ProblemDetails,
  import('@idemkit/fastify').IdempotencyContext | import('@idemkit/fastify').IdempotencyErrorCode | import('@idemkit/fastify').IdempotencyEvent | import('@idemkit/fastify').IdempotencyStore | import('@idemkit/fastify').ProblemDetails,
];
