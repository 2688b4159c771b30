/**
 * What an `idempotent()` job hands back, on real stores: never another writer's record as its
 * result, and the same shape whether or not the store was there to keep it.
 */
import type { AddressInfo } from 'node:net';
import { FingerprintMismatchError, idempotent, type IdempotencyStore, type IdempotentOptions } from '@idemkit/core';
import { idempotency } from '@idemkit/express';
import { uniqueSuffix } from '@idemkit/test-services';
import express from 'express';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { Outcome } from '../src/job-worker.js';
import { openStore, type OpenedStore } from '../src/open-store.js';
import { dropNamespace } from '../src/records.js';
import { serviceUrl } from '../src/services.js';
import type { ServerProcess } from '../src/spawn.js';
import { deliverTo, jobWorkersOn } from './support/job-workers.js';
import { post } from './support/http.js';
import { ThrowawayRedis } from './support/redis-server.js';

describe.each(['postgres', 'redis'] as const)('a job and a webhook route on one %s store, keyed by the same event id', (kind) => {
  const ns = `job_shared_${uniqueSuffix()}`;
  let url = '';
  let opened: OpenedStore;
  let server: ReturnType<ReturnType<typeof express>['listen']>;
  let base = '';

  beforeAll(async () => {
    url = await serviceUrl(kind);
    opened = await openStore(kind, url, ns);
    // The webhook receiver: acknowledges each event once; Stripe-style retries vary in their
    // headers and signature, so the route turns the body check off.
    const app = express();
    app.post('/webhooks', express.json(), idempotency({ store: opened.store, fingerprint: false }), (_req, res) => void res.json({ received: true }));
    server = app.listen(0, '127.0.0.1');
    await new Promise((r) => server.once('listening', r));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });

  afterAll(async () => {
    await new Promise((r) => server?.close(r));
    await opened?.close();
    await dropNamespace(kind, url, [`${ns}_keys`], `${ns}:`);
  });

  it.each([false, true])("the job never takes the route's stored answer as its own result (localCache: %s): a mismatch, as with another job's record", async (localCache) => {
    const eventId = `evt_${localCache ? 'cached' : 'plain'}`;
    const ack = await post(`${base}/webhooks`, { id: eventId }, { 'idempotency-key': eventId });
    expect(ack.status).toBe(200);
    expect(JSON.parse(ack.text)).toEqual({ received: true });

    let runs = 0;
    const processEvent = idempotent(
      async (event: { id: string }) => {
        runs++;
        return { processed: event.id };
      },
      { store: opened.store, name: 'process-event', key: (event) => event.id, localCache },
    );
    // Before, both calls resolved with { received: true }, the route's body, and the event was
    // never processed: the route's record has no fingerprint, which matched anything.
    for (let i = 0; i < 2; i++) await expect(processEvent({ id: eventId })).rejects.toBeInstanceOf(FingerprintMismatchError);
    expect(runs).toBe(0);
  });

  // Was: the route answered the job's result ({"processed":…}, 200, Idempotent-Replayed: true) as
  // its own and never ran: a route with `fingerprint: false` took the job's record for its own.
  it('the route never sends the job result stored under its key as its answer: a 422 mismatch, twice', async () => {
    const eventId = 'evt_job_first';
    const processEvent = idempotent(async (event: { id: string }) => ({ processed: event.id }), { store: opened.store, name: 'process-event', key: (event) => event.id });
    expect(await processEvent({ id: eventId })).toEqual({ processed: eventId });
    for (let i = 0; i < 2; i++) {
      const answer = await post(`${base}/webhooks`, { id: eventId }, { 'idempotency-key': eventId });
      expect(answer.status).toBe(422);
      expect(answer.headers.get('idempotent-replayed')).toBeNull();
      expect(JSON.parse(answer.text)).toMatchObject({ code: 'ERR_IDEMKIT_FINGERPRINT_MISMATCH' });
    }
    // The job's record is untouched: it still replays to the job.
    expect(await processEvent({ id: eventId })).toEqual({ processed: eventId });
  });
});

/** A queue consumer's handling of one message: redelivered while it rejects, three times at most. */
async function consumed<T>(job: (orderId: string) => Promise<T>, orderId: string): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await job(orderId);
    } catch (error) {
      if (attempt === 3) throw error;
    }
  }
}

describe("a job with onStoreError: 'pass' on a Redis that goes away", () => {
  let redis: ThrowawayRedis;
  let opened: OpenedStore;
  const ns = `job_pass_${uniqueSuffix()}`;

  beforeAll(async () => {
    redis = await ThrowawayRedis.start();
    opened = await openStore('redis', redis.url, ns);
  });

  afterAll(async () => {
    await opened?.close();
    await redis?.stop();
  });

  /** `result` as a job on this store with onStoreError 'pass', counting its runs and keeping its warnings. */
  function passJob<R>(name: string, result: (orderId: string) => R, codec: Pick<IdempotentOptions<[string], R>, 'serialize' | 'deserialize'> = {}) {
    const seen = { runs: 0, warnings: [] as string[] };
    const job = idempotent(
      async (orderId: string) => {
        seen.runs++;
        return result(orderId);
      },
      { store: opened.store as IdempotencyStore, name, key: (orderId) => orderId, onStoreError: 'pass', storeTimeoutMs: 500, logger: { warn: (m: string) => seen.warnings.push(m), error: () => undefined }, ...codec },
    );
    return { job, seen };
  }

  it('gives the same value shape with the store gone as with it there (a Date is its JSON text both times)', async () => {
    const { job, seen } = passJob('charge', (orderId) => ({ orderId, chargedAt: new Date(Date.UTC(2026, 0, 2)) }));
    const stored = await job('order-1');
    expect(stored).toEqual({ orderId: 'order-1', chargedAt: '2026-01-02T00:00:00.000Z' });

    await redis.down();
    // Before, a Date object here: code that handled the string (`chargedAt.slice(0, 10)`)
    // worked until the store went away, and then threw after the charge was made.
    const passed = await job('order-2');
    expect(passed).toEqual({ orderId: 'order-2', chargedAt: '2026-01-02T00:00:00.000Z' });
    expect(typeof passed.chargedAt).toBe('string');
    expect(seen.runs).toBe(2);
  });

  // Was (since results were round-tripped in 'pass'): fn ran, nothing could be stored, and then
  // the call rejected because its result would not serialise (an Error kept for a declined
  // charge, say). A queue consumer retries a rejected message, and with the store still gone
  // nothing stops fn: every redelivery charged again. With the store there, fn runs once and the
  // 410 marker stops the redeliveries; here the call has to resolve for it to run once.
  it('a result JSON cannot hold, with the store gone: fn ran, so the call resolves with it (warned) instead of inviting a redelivery that runs fn again', async () => {
    await redis.down();
    const { job, seen } = passJob('charge-or-decline', (orderId) => ({ orderId, declined: new Error('card declined') }));
    const result = (await consumed(job, 'order-3')) as { orderId: string; declined: unknown };
    expect(seen.runs).toBe(1);
    expect(result.orderId).toBe('order-3');
    expect(result.declined).toBeInstanceOf(Error);
    expect(seen.warnings.some((w) => w.includes('charge-or-decline') && w.includes('serialis'))).toBe(true);
  });

  // The same for a `deserialize` that cannot read what `serialize` wrote (a schema check that
  // refuses an old shape, say): the call rejected after fn ran, and each redelivery ran fn again.
  it('a deserialize that throws, with the store gone: fn ran, so the call resolves with its value (warned), and runs once', async () => {
    await redis.down();
    const { job, seen } = passJob('charge-versioned', (orderId) => ({ orderId, charged: 4200 }), {
      serialize: (result) => JSON.stringify(result),
      deserialize: () => {
        throw new Error('unsupported result version');
      },
    });
    expect(await consumed(job, 'order-4')).toEqual({ orderId: 'order-4', charged: 4200 });
    expect(seen.runs).toBe(1);
    expect(seen.warnings.some((w) => w.includes('charge-versioned') && w.includes('unsupported result version'))).toBe(true);
  });
});

describe.each(['postgres', 'redis'] as const)('two worker processes on one %s store: what a duplicate that cannot get the result is told', (kind) => {
  const workers = jobWorkersOn(kind, 'job_errors');
  const { ns } = workers;

  it('in progress past waitTimeoutMs: the job, the wait and when to retry, in words a job caller knows; another amount: a mismatch that says so', async () => {
    const [a, b] = (await workers.spawn(2, { LEASE_MS: '10000', WAIT_TIMEOUT_MS: '300' })) as [ServerProcess, ServerProcess];
    const deliver = (worker: ServerProcess, cents: number, workMs: number): Promise<Outcome> => deliverTo(worker, { orderId: `${ns}-o1`, cents }, workMs);
    const first = deliver(a, 100, 3_000);
    await vi.waitFor(() => expect(a.events('RUN')).toHaveLength(1), { timeout: 10_000, interval: 10 });

    const busy = await deliver(b, 100, 10);
    expect(busy).toMatchObject({ ok: false, name: 'RequestInProgressError' });
    // Before: 'A request with this key is still being processed. Retry after the time in Retry-After …'
    expect(busy.ok ? '' : busy.message).toMatch(/^Another call of "charge" with this key is still running, in this process or another, and this call did not get its result \(it waits at most waitTimeoutMs, 300 ms\)\. Retry in (\d+) s \(err\.extensions\.retryAfter\)/);
    // The seconds left on the holder's 10 s lease: at least 1, at most 10.
    const seconds = Number(/Retry in (\d+) s/.exec(busy.ok ? '' : busy.message)?.[1]);
    expect(seconds).toBeGreaterThanOrEqual(1);
    expect(seconds).toBeLessThanOrEqual(10);
    const other = await deliver(b, 999, 10);
    expect(other).toMatchObject({ ok: false, name: 'FingerprintMismatchError' });
    // Before: '… with a different request (method, path or body). Use a new key for a new request.'
    expect(other.ok ? '' : other.message).toMatch(/^This key was already used by a call of "charge" with other arguments, or by another job or an HTTP route on the same store; fn was not run\./);
    expect(await first).toMatchObject({ ok: true });
    expect(b.events('RUN')).toEqual([]);
  });
});
