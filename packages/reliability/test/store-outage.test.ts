/**
 * Issue 10.3: the store going away mid-run. Our own throwaway redis-server is SIGKILLed under load;
 * the app's Postgres connections are terminated (pg_terminate_backend) under load. Every request is
 * answered within storeTimeoutMs + 2 s (plus the handler's own time), failures are 503 problems
 * (fail closed), no handler runs without a lease, and the same app processes recover on their own.
 */
import { createIdempotentFetch } from '@idemkit/client';
import pg from 'pg';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { post, type Answer } from './support/http.js';
import { countRecords, dropNamespace, location } from '../src/records.js';
import { ThrowawayRedis } from './support/redis-server.js';
import { namespace, serviceUrl } from '../src/services.js';
import { APP, DEMO, ProcessPool, type ServerProcess } from '../src/spawn.js';

const STORE_TIMEOUT_MS = 1_000;
const WORK_MS = 150;
const BOUND_MS = STORE_TIMEOUT_MS + 2_000 + WORK_MS;
const LEASE_MS = 1_500;
const pool = new ProcessPool();
afterAll(() => pool.stopAll());

function spawnTrio(env: Record<string, string>): Promise<ServerProcess[]> {
  const common = { LEASE_MS: String(LEASE_MS), STORE_TIMEOUT_MS: String(STORE_TIMEOUT_MS), WORK_MS: String(WORK_MS), ...env };
  return Promise.all(['fastify', 'express', 'koa'].map((FRAMEWORK) => pool.spawn(APP, { ...common, FRAMEWORK })));
}

const runs = (apps: ServerProcess[], key: string) => apps.flatMap((a) => a.events('RUN')).filter((e) => e.key === key).length;

interface Sent {
  readonly key: string;
  readonly answer: Answer;
}

/** Send one request per key, round-robin over the apps, all at once. */
function burst(apps: ServerProcess[], keys: string[]): Promise<Sent[]> {
  return Promise.all(
    keys.map(async (key, i) => ({ key, answer: await post(`${apps[i % apps.length]!.url}/orders`, { key }, { 'idempotency-key': key }) })),
  );
}

/** Retry keys the way a client would (@idemkit/client: 409 + Retry-After and 503 are retried). */
async function retryAll(apps: ServerProcess[], keys: string[]): Promise<number[]> {
  const fetchSafe = createIdempotentFetch({ baseDelayMs: 50, maxDelayMs: 500, maxAttempts: 30, deadlineMs: 20_000 });
  return Promise.all(
    keys.map(async (key, i) => {
      const res = await fetchSafe(`${apps[i % apps.length]!.url}/orders`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ key }),
        idempotencyKey: key,
      });
      return res.status;
    }),
  );
}

/** The fail-closed contract for every answer given while the store was failing. */
function expectFailClosed(apps: ServerProcess[], sent: Sent[]): void {
  for (const { key, answer } of sent) {
    expect(answer.ms, `answer time of ${key}`).toBeLessThanOrEqual(BOUND_MS);
    expect([201, 503], `status of ${key}: ${answer.text}`).toContain(answer.status);
    if (answer.status === 503) {
      expect(answer.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      expect(JSON.parse(answer.text)).toMatchObject({ status: 503, type: 'https://idemkit.dev/problems/store-unavailable' });
      expect(runs(apps, key), `handler runs of 503 key ${key}`).toBe(0);
    } else {
      expect(runs(apps, key), `handler runs of 201 key ${key}`).toBe(1);
    }
  }
}

describe('Redis killed mid-run and brought back', () => {
  it('503 within the bound while it is gone, no handler without a lease, recovery without restarting the apps', async () => {
    const redis = await ThrowawayRedis.start();
    const ns = namespace('outage_redis');
    try {
      const apps = await spawnTrio({ STORE: 'redis', STORE_URL: redis.url, PREFIX: ns });
      const pids = apps.map((a) => a.pid);
      const keys = (tag: string, n: number) => Array.from({ length: n }, (_, i) => `${ns}-${tag}-${i}`);

      const healthy = await burst(apps, keys('healthy', 6));
      expect(healthy.map((s) => s.answer.status)).toEqual(Array(6).fill(201));

      // Mid-run: the server dies while the first wave holds leases and the second wave arrives.
      const wave1 = burst(apps, keys('mid1', 15));
      await vi.waitFor(() => expect(apps.flatMap((a) => a.events('RUN')).length).toBeGreaterThan(6), { timeout: 5_000, interval: 5 });
      await redis.down();
      const wave2 = burst(apps, keys('mid2', 15));
      const mid = [...(await wave1), ...(await wave2)];
      expectFailClosed(apps, mid);
      expect(mid.filter((s) => s.answer.status === 503).length).toBeGreaterThanOrEqual(15);

      const down = await burst(apps, keys('down', 9));
      expectFailClosed(apps, down);
      expect(down.every((s) => s.answer.status === 503)).toBe(true);

      await redis.up(); // same port, empty (no persistence): the apps must reconnect by themselves
      await vi.waitFor(
        async () => expect((await post(`${apps[0]!.url}/orders`, {}, { 'idempotency-key': `${ns}-probe-${Date.now()}` })).status).toBe(201),
        { timeout: 20_000, interval: 200 },
      );
      // A begin that timed out at the engine may still reach Redis later (ioredis replays its
      // offline queue on reconnect): its key is then held by a lease nobody runs under, and the
      // retry waits it out through 409 + Retry-After.
      const refused = [...mid, ...down].filter((s) => s.answer.status === 503).map((s) => s.key);
      expect(await retryAll(apps, refused)).toEqual(Array(refused.length).fill(201));
      for (const key of refused) expect(runs(apps, key), key).toBe(1);
      expect(apps.map((a) => a.pid)).toEqual(pids);
      expect(apps.every((a) => a.child.exitCode === null)).toBe(true);
      await Promise.all(apps.map((a) => a.stop()));
    } finally {
      await redis.stop();
    }
  });
});

describe('Postgres connections terminated mid-run', () => {
  it('503 within the bound while connections die, no handler without a lease, the pools recover by themselves', async () => {
    const base = await serviceUrl('postgres');
    const ns = namespace('outage_pg');
    const appUrl = new URL(base);
    appUrl.searchParams.set('application_name', ns);
    const admin = new pg.Client({ connectionString: base });
    await admin.connect();
    try {
      const apps = await spawnTrio({ STORE: 'postgres', STORE_URL: appUrl.toString(), PREFIX: ns });
      const pids = apps.map((a) => a.pid);
      const keys = (tag: string, n: number) => Array.from({ length: n }, (_, i) => `${ns}-${tag}-${i}`);
      expect((await burst(apps, keys('healthy', 6))).map((s) => s.answer.status)).toEqual(Array(6).fill(201));

      // Terminate every connection of the apps every 40 ms for 1.5 s while three waves run.
      let killed = 0;
      const stopAt = Date.now() + 1_500;
      const terminator = (async () => {
        while (Date.now() < stopAt) {
          const { rowCount } = await admin.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1', [ns]);
          killed += rowCount ?? 0;
          await new Promise((r) => setTimeout(r, 40));
        }
      })();
      const waves: Sent[] = [];
      for (let w = 0; Date.now() < stopAt - 200 && w < 10; w++) waves.push(...(await burst(apps, keys(`mid${w}`, 12))));
      await terminator;
      expect(killed).toBeGreaterThan(0);
      expectFailClosed(apps, waves);
      expect(waves.some((s) => s.answer.status === 503)).toBe(true);

      // Recovery: the refused keys go through (a begin that committed before its connection died
      // leaves a lease nobody holds: the client waits it out via 409 + Retry-After).
      const refused = waves.filter((s) => s.answer.status === 503).map((s) => s.key);
      expect(await retryAll(apps, refused)).toEqual(Array(refused.length).fill(201));
      for (const key of refused) expect(runs(apps, key), key).toBe(1);
      expect(apps.map((a) => a.pid)).toEqual(pids);

      // Settled: no lease is live once the ones orphaned by dead connections have run out.
      await vi.waitFor(async () => expect((await countRecords('postgres', base, location('postgres', ns, 'app'))).liveLeases).toBe(0), {
        timeout: LEASE_MS + 3_000,
        interval: 200,
      });
      await Promise.all(apps.map((a) => a.stop()));
    } finally {
      await admin.end();
      await dropNamespace('postgres', base, [`${ns}_keys`]);
    }
  });
});

describe('the demo on Postgres when the server drops its idle connections', () => {
  // Was a defect (apps/demo/src/backend.ts): the demo's own pg.Pool had no 'error' listener, so an
  // idle connection terminated by the server ended the process. The demo now listens.
  it('keeps serving after pg_terminate_backend of its idle connections', async () => {
    const base = await serviceUrl('postgres');
    const ns = namespace('demo_pgterm');
    const appUrl = new URL(base);
    appUrl.searchParams.set('application_name', ns);
    const admin = new pg.Client({ connectionString: base });
    await admin.connect();
    try {
      const demo = await pool.spawn(DEMO, { FRAMEWORK: 'fastify', STORE: 'postgres', DATABASE_URL: appUrl.toString(), DEMO_NAMESPACE: ns, DEMO_WORK_MS: '0' });
      const order = (key: string) => post(`${demo.url}/orders`, { item: 'a', amount: 1 }, { 'idempotency-key': key });
      expect((await order(`${ns}-before`)).status).toBe(201); // leaves idle connections in the pool
      await admin.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1', [ns]);
      await vi.waitFor(
        async () => expect((await admin.query('SELECT 1 FROM pg_stat_activity WHERE application_name = $1', [ns])).rowCount).toBe(0),
        { timeout: 5_000, interval: 20 },
      );
      const fetchSafe = createIdempotentFetch({ baseDelayMs: 50, maxDelayMs: 200, maxAttempts: 10 });
      const after = await fetchSafe(`${demo.url}/orders`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ item: 'a', amount: 1 }),
        idempotencyKey: `${ns}-after`,
      });
      expect(after.status).toBe(201);
      expect(demo.child.exitCode).toBeNull();
      await demo.stop();
    } finally {
      await admin.end();
      await dropNamespace('postgres', base, [`${ns}_orders`, `${ns}_idempotency_keys`]);
    }
  });
});
