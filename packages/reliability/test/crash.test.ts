/**
 * Issue 10.2: a crashed handler. A server process is SIGKILLed while it holds a lease: during the
 * lease duplicates get 409 + Retry-After; after it, one retry runs the handler once and later ones
 * replay. A paused holder (SIGSTOP) that wakes after another process took over and completed has
 * its late completion refused; the winner's stored response stays.
 */
import pg from 'pg';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { post, type Answer } from './support/http.js';
import { countRecords, dropNamespace, location, type StoreKind } from '../src/records.js';
import { namespace, serviceUrl } from '../src/services.js';
import { APP, ProcessPool, type ServerProcess } from '../src/spawn.js';

const LEASE_MS = 2_000;
const pool = new ProcessPool();
afterAll(() => pool.stopAll());

const stores: StoreKind[] = ['redis', 'postgres', 'mongodb'];

async function pair(kind: StoreKind, url: string, ns: string): Promise<[ServerProcess, ServerProcess]> {
  const env = { STORE: kind, STORE_URL: url, PREFIX: ns, LEASE_MS: String(LEASE_MS), STORE_TIMEOUT_MS: '3000' };
  return Promise.all([pool.spawn(APP, { ...env, FRAMEWORK: 'fastify' }), pool.spawn(APP, { ...env, FRAMEWORK: 'express' })]);
}

const runsOf = (p: ServerProcess, key: string) => p.events('RUN').filter((e) => e.key === key);
const idOf = (text: string) => (JSON.parse(text) as { id: string }).id;

describe.each(stores)('a crashed or paused lease holder on %s', (kind) => {
  it('SIGKILL while holding the lease: 409 + Retry-After during it, then exactly one takeover run, then replays', async () => {
    const url = await serviceUrl(kind);
    const ns = namespace(`crash_${kind.replace('-', '_')}`);
    const [a, b] = await pair(kind, url, ns);
    const key = `${ns}-killed`;
    const body = { item: 'book' };
    try {
      // A starts a handler that would run for a minute; it never finishes.
      const doomed = post(`${a.url}/orders`, body, { 'idempotency-key': key, 'x-work-ms': '60000' }).catch((e: unknown) => e);
      await vi.waitFor(() => expect(runsOf(a, key)).toHaveLength(1), { timeout: 10_000, interval: 10 });
      a.child.kill('SIGKILL');
      expect(await doomed).toBeInstanceOf(Error); // the client of the crashed process saw the connection drop

      const during = await post(`${b.url}/orders`, body, { 'idempotency-key': key });
      expect(during.status).toBe(409);
      expect(during.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      const retryAfter = Number(during.headers.get('retry-after'));
      expect(retryAfter).toBeGreaterThanOrEqual(1);
      expect(retryAfter).toBeLessThanOrEqual(Math.ceil(LEASE_MS / 1000));
      expect(runsOf(b, key)).toHaveLength(0);

      // Poll until the lease has ended: every answer before that is a 409, the first other is the takeover.
      let first: Awaited<ReturnType<typeof post>> | undefined;
      await vi.waitFor(
        async () => {
          const r = await post(`${b.url}/orders`, body, { 'idempotency-key': key, 'x-work-ms': '20' });
          if (r.status === 409) throw new Error('still leased');
          first = r;
        },
        { timeout: LEASE_MS + 8_000, interval: 100 },
      );
      expect(first!.status).toBe(201);
      expect(first!.headers.get('idempotent-replayed')).toBeNull();
      expect(runsOf(b, key)).toHaveLength(1);
      expect(b.events('LEASE-TAKEN-OVER').map((e) => e.key)).toContain(key);

      const later = await Promise.all(Array.from({ length: 5 }, () => post(`${b.url}/orders`, body, { 'idempotency-key': key })));
      for (const r of later) {
        expect(r.status).toBe(201);
        expect(r.headers.get('idempotent-replayed')).toBe('true');
        expect(r.text).toBe(first!.text);
      }
      expect(runsOf(b, key)).toHaveLength(1);
      expect(await countRecords(kind, url, location(kind, ns, 'app'))).toMatchObject({ total: 1, completed: 1, inProgress: 0 });
    } finally {
      await Promise.all([a.stop(), b.stop()]);
      await dropNamespace(kind, url, [`${ns}_keys`], `${ns}:`);
    }
  });

  it('SIGSTOP the holder, another process takes over and completes, SIGCONT: the late completion is refused, the winner stays', async () => {
    const url = await serviceUrl(kind);
    const ns = namespace(`pause_${kind.replace('-', '_')}`);
    const [a, b] = await pair(kind, url, ns);
    const key = `${ns}-paused`;
    const body = { item: 'lamp' };
    try {
      const slow = post(`${a.url}/orders`, body, { 'idempotency-key': key, 'x-work-ms': String(LEASE_MS + 500) });
      await vi.waitFor(() => expect(runsOf(a, key)).toHaveLength(1), { timeout: 10_000, interval: 10 });
      a.child.kill('SIGSTOP'); // a GC pause or a frozen VM: no renewals, no progress

      let winner: Awaited<ReturnType<typeof post>> | undefined;
      await vi.waitFor(
        async () => {
          const r = await post(`${b.url}/orders`, body, { 'idempotency-key': key, 'x-work-ms': '10' });
          if (r.status === 409) throw new Error('still leased');
          winner = r;
        },
        { timeout: LEASE_MS + 8_000, interval: 100 },
      );
      expect(winner!.status).toBe(201);
      expect(runsOf(b, key)).toHaveLength(1);

      a.child.kill('SIGCONT');
      const late = await slow; // A's own client still gets what A's handler produced
      expect(late.status).toBe(201);
      expect(idOf(late.text)).not.toBe(idOf(winner!.text));
      await vi.waitFor(() => expect(a.events('LEASE-LOST').some((e) => e.key === key)).toBe(true), { timeout: 5_000 });

      // Every process now replays the winner, never the late result.
      for (const p of [a, b, a]) {
        const r = await post(`${p.url}/orders`, body, { 'idempotency-key': key });
        expect(r.status).toBe(201);
        expect(r.headers.get('idempotent-replayed')).toBe('true');
        expect(r.text).toBe(winner!.text);
      }
      expect(runsOf(a, key)).toHaveLength(1);
      expect(runsOf(b, key)).toHaveLength(1);
      expect(await countRecords(kind, url, location(kind, ns, 'app'))).toMatchObject({ total: 1, completed: 1, inProgress: 0 });
    } finally {
      await Promise.all([a.stop(), b.stop()]);
      await dropNamespace(kind, url, [`${ns}_keys`], `${ns}:`);
    }
  });
});

describe('transactional mode on Postgres: a stalled or killed holder’s business write never commits', () => {
  const ordersOf = async (url: string, ns: string, key: string) => {
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    try {
      return (await client.query<{ id: string }>(`SELECT id FROM "${ns}_orders" WHERE label = $1`, [`|${key}`])).rows.map((r) => r.id);
    } finally {
      await client.end();
    }
  };

  it('SIGKILL after the order insert: Postgres aborts that transaction, the takeover’s order is the only one', async () => {
    const url = await serviceUrl('postgres');
    const ns = namespace('txkill');
    const env = { STORE: 'postgres', STORE_URL: url, PREFIX: ns, LEASE_MS: String(LEASE_MS), TRANSACTIONAL: '1' };
    const [a, b] = await Promise.all([pool.spawn(APP, { ...env, FRAMEWORK: 'koa' }), pool.spawn(APP, { ...env, FRAMEWORK: 'fastify' })]);
    const key = `${ns}-k`;
    try {
      const doomed = post(`${a.url}/orders`, {}, { 'idempotency-key': key, 'x-work-ms': '60000' }).catch((e: unknown) => e);
      await vi.waitFor(() => expect(runsOf(a, key)).toHaveLength(1), { timeout: 10_000, interval: 10 });
      a.child.kill('SIGKILL');
      await doomed;
      let winner: Awaited<ReturnType<typeof post>> | undefined;
      await vi.waitFor(
        async () => {
          const r = await post(`${b.url}/orders`, {}, { 'idempotency-key': key });
          if (r.status === 409) throw new Error('still leased');
          winner = r;
        },
        { timeout: LEASE_MS + 8_000, interval: 100 },
      );
      expect(winner!.status).toBe(201);
      expect(await ordersOf(url, ns, key)).toEqual([idOf(winner!.text)]);
    } finally {
      await Promise.all([a.stop(), b.stop()]);
      await dropNamespace('postgres', url, [`${ns}_keys`, `${ns}_orders`]);
    }
  });

  /** Run once, read by two tests: a paused transactional holder wakes after a takeover. */
  let paused: Promise<{ late: Answer; winner: Answer; replay: Answer; orders: string[] }> | undefined;
  const pausedTakeover = () =>
    (paused ??= (async () => {
      const url = await serviceUrl('postgres');
      const ns = namespace('txstop');
      const env = { STORE: 'postgres', STORE_URL: url, PREFIX: ns, LEASE_MS: String(LEASE_MS), TRANSACTIONAL: '1' };
      const [a, b] = await Promise.all([pool.spawn(APP, { ...env, FRAMEWORK: 'express' }), pool.spawn(APP, { ...env, FRAMEWORK: 'fastify' })]);
      const key = `${ns}-k`;
      try {
        const slow = post(`${a.url}/orders`, {}, { 'idempotency-key': key, 'x-work-ms': String(LEASE_MS + 500) });
        await vi.waitFor(() => expect(runsOf(a, key)).toHaveLength(1), { timeout: 10_000, interval: 10 });
        a.child.kill('SIGSTOP');
        let winner: Answer | undefined;
        await vi.waitFor(
          async () => {
            const r = await post(`${b.url}/orders`, {}, { 'idempotency-key': key, 'x-work-ms': '10' });
            if (r.status === 409) throw new Error('still leased');
            winner = r;
          },
          { timeout: LEASE_MS + 8_000, interval: 100 },
        );
        a.child.kill('SIGCONT');
        const late = await slow;
        await vi.waitFor(() => expect(a.events('LEASE-LOST').some((e) => e.key === key)).toBe(true), { timeout: 5_000 });
        const replay = await post(`${a.url}/orders`, {}, { 'idempotency-key': key });
        return { late, winner: winner!, replay, orders: await ordersOf(url, ns, key) };
      } finally {
        await Promise.all([a.stop(), b.stop()]);
        await dropNamespace('postgres', url, [`${ns}_keys`, `${ns}_orders`]);
      }
    })());

  it('SIGSTOP after the order insert, takeover, SIGCONT: the late transaction rolls back, one order, the winner replays', async () => {
    const { winner, replay, orders } = await pausedTakeover();
    expect(winner.status).toBe(201);
    expect(orders).toEqual([idOf(winner.text)]);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(replay.text).toBe(winner.text);
  });

  // Was a defect: the late holder's rolled-back 201 reached its client. Now the lease carries a
  // replacement (the winner's stored response, 409 or 503) and every binding sends that instead.
  it('the paused holder’s client is never told about its rolled-back order', async () => {
    const { late, winner, orders } = await pausedTakeover();
    // The winner's stored response, or 409 / 503 while there is none: never a 201 of its own.
    expect([201, 409, 503]).toContain(late.status);
    if (late.status === 201) expect(late.text).toBe(winner.text);
    expect(orders).toEqual([idOf(winner.text)]);
  });
});
