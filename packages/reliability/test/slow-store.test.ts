/**
 * Issue 10.4: a slow store. A TCP proxy adds latency between the apps and Redis / Postgres.
 * Requests are still answered within lease + bound, and a handler running 4× leaseMs
 * keeps its lease (renewed through the slow link): concurrent duplicates get 409, never a second run.
 */
import { afterAll, describe, expect, it, vi } from 'vitest';
import { post, type Answer } from './support/http.js';
import { countRecords, dropNamespace, location, type StoreKind } from '../src/records.js';
import { namespace, serviceUrl } from '../src/services.js';
import { APP, ProcessPool } from '../src/spawn.js';
import { startLatencyProxy } from './support/tcp-proxy.js';

const LATENCY_MS = 60; // each way, per chunk: ~120 ms per store round trip
const LEASE_MS = 900;
const STORE_TIMEOUT_MS = 2_000;
const BOUND_MS = LEASE_MS + STORE_TIMEOUT_MS;
const pool = new ProcessPool();
afterAll(() => pool.stopAll());

const stores: StoreKind[] = ['redis', 'postgres'];

describe.each(stores)(`%s behind a proxy adding ${LATENCY_MS} ms each way`, (kind) => {
  it('answers within lease + bound, and a handler longer than 3× the lease is never taken over', async () => {
    const url = await serviceUrl(kind);
    const target = new URL(url);
    const proxy = await startLatencyProxy({ host: target.hostname, port: Number(target.port) }, LATENCY_MS);
    const viaProxy = new URL(url);
    viaProxy.port = String(proxy.port);
    const ns = namespace(`slow_${kind}`);
    try {
      const env = { STORE: kind, STORE_URL: viaProxy.toString(), PREFIX: ns, LEASE_MS: String(LEASE_MS), STORE_TIMEOUT_MS: String(STORE_TIMEOUT_MS) };
      const [a, b] = await Promise.all([pool.spawn(APP, { ...env, FRAMEWORK: 'fastify' }), pool.spawn(APP, { ...env, FRAMEWORK: 'koa' })]);

      const quick = await Promise.all(
        Array.from({ length: 20 }, (_, i) => post(`${[a, b][i % 2]!.url}/orders`, { i }, { 'idempotency-key': `${ns}-q-${i}` })),
      );
      for (const r of quick) {
        expect(r.status).toBe(201);
        expect(r.ms).toBeLessThanOrEqual(BOUND_MS);
      }

      const key = `${ns}-long`;
      const workMs = 4 * LEASE_MS;
      const long = post(`${a.url}/orders`, { item: 'long' }, { 'idempotency-key': key, 'x-work-ms': String(workMs) });
      let settled = false;
      void long.finally(() => (settled = true));
      await vi.waitFor(() => expect(a.events('RUN').some((e) => e.key === key)).toBe(true), { timeout: 5_000, interval: 5 });
      const runSeenAt = Date.now();

      // Duplicates on the other process for the whole run, paced at a sixth of the lease.
      const duplicates: Array<Answer & { sentAt: number }> = [];
      for (let i = 0; i < 80 && !settled; i++) {
        const sentAt = Date.now();
        duplicates.push({ ...(await post(`${b.url}/orders`, { item: 'long' }, { 'idempotency-key': key })), sentAt });
        await new Promise((r) => setTimeout(r, LEASE_MS / 6));
      }
      const first = await long;
      expect(first.status).toBe(201);
      const during = duplicates.filter((d) => d.headers.get('idempotent-replayed') !== 'true');
      // What matters is not how many fit (that depends on the machine's speed) but that they kept
      // coming: one was still refused with 409 after three whole leases, which only renewals
      // through the slow link can have kept alive (a lapsed lease would have been taken over).
      expect(during.length).toBeGreaterThanOrEqual(3);
      expect(Math.max(...during.map((d) => d.sentAt - runSeenAt))).toBeGreaterThanOrEqual(3 * LEASE_MS);
      for (const d of during) {
        expect(d.status).toBe(409);
        expect(Number(d.headers.get('retry-after'))).toBeLessThanOrEqual(Math.ceil(LEASE_MS / 1000));
        expect(d.ms).toBeLessThanOrEqual(BOUND_MS);
      }
      for (const d of duplicates.filter((x) => x.headers.get('idempotent-replayed') === 'true')) expect(d.text).toBe(first.text);

      const replay = await post(`${b.url}/orders`, { item: 'long' }, { 'idempotency-key': key });
      expect(replay.headers.get('idempotent-replayed')).toBe('true');
      expect(replay.text).toBe(first.text);
      expect([...a.events('RUN'), ...b.events('RUN')].filter((e) => e.key === key)).toHaveLength(1);
      expect(a.events('LEASE-LOST')).toHaveLength(0);
      expect(b.events('LEASE-TAKEN-OVER')).toHaveLength(0);
      expect(await countRecords(kind, url, location(kind, ns, 'app'))).toMatchObject({ total: 21, inProgress: 0 });
      await Promise.all([a.stop(), b.stop()]);
    } finally {
      await proxy.close();
      await dropNamespace(kind, url, [`${ns}_keys`], `${ns}:`);
    }
  });
});
