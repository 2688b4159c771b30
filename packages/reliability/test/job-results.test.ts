/**
 * What an `idempotent()` job hands back, on real stores: never another writer's record as its
 * result.
 */
import type { AddressInfo } from 'node:net';
import { FingerprintMismatchError, idempotent } from '@idemkit/core';
import { idempotency } from '@idemkit/express';
import { uniqueSuffix } from '@idemkit/test-services';
import express from 'express';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openStore, type OpenedStore } from '../src/open-store.js';
import { dropNamespace } from '../src/records.js';
import { serviceUrl } from '../src/services.js';
import { post } from './support/http.js';

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
});
