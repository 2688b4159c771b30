/**
 * Transactional mode on Postgres, through the bindings over real sockets: a client that leaves
 * while its handler works. The bindings then let the lease run out a lease later (a handler hung
 * for good must not hold its transaction and key for ever), but a handler that finishes before
 * that must still have its writes committed with its answer, and the retry gets the replay: one
 * row, one run. Koa and Fastify started doing this today (Express already did).
 */
import { randomUUID } from 'node:crypto';
import { pgTransaction } from '@idemkit/postgres';
import { describe, expect, it, vi } from 'vitest';
import { serveOrders, type Framework, type OrderWork } from './support/orders-apps.js';
import { ordersSchema } from './support/orders-schema.js';

const db = ordersSchema('rev_client_left');
const LEASE_MS = 1_500;

interface Harness {
  url: string;
  runs(key: string): number;
  /** Resolves when the server has seen the client of `key`'s first request leave. */
  left(key: string): Promise<void>;
  /** Lets the first run of `key` finish (insert done already). */
  finish(key: string): void;
  close(): Promise<void>;
}

async function start(framework: Framework): Promise<Harness> {
  const runs = new Map<string, number>();
  const gates = new Map<string, { open: () => void; opened: Promise<void>; left: Promise<void>; sawLeave: () => void }>();
  const gate = (key: string) => {
    let entry = gates.get(key);
    if (!entry) {
      let open!: () => void;
      let sawLeave!: () => void;
      const opened = new Promise<void>((resolve) => (open = resolve));
      const left = new Promise<void>((resolve) => (sawLeave = resolve));
      entry = { open, opened, left, sawLeave };
      gates.set(key, entry);
    }
    return entry;
  };
  const options = { store: db.store, transactional: true, leaseMs: LEASE_MS, logger: false as const };
  const work: OrderWork = async (context, raw) => {
    const key = context?.key ?? '';
    const n = (runs.get(key) ?? 0) + 1;
    runs.set(key, n);
    await pgTransaction(context).query(`INSERT INTO ${db.rows} (ref) VALUES ($1)`, [key]);
    if (n === 1) {
      const g = gate(key);
      raw.once('close', g.sawLeave);
      await g.opened;
    }
    return 201;
  };
  const app = await serveOrders(framework, options, work);
  return {
    url: app.url,
    runs: (key) => runs.get(key) ?? 0,
    left: (key) => gate(key).left,
    finish: (key) => gate(key).open(),
    close: app.close,
  };
}

const count = (key: string): Promise<number> => db.count(key);

/**
 * POST /orders with `key`, cancelled once its handler runs; resolves when the server has seen the
 * client leave, with the way to send the same request again.
 */
async function leaveWhileRunning(app: Harness, key: string): Promise<() => Promise<Response>> {
  const post = (signal?: AbortSignal) =>
    fetch(`${app.url}/orders`, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': key }, body: '{}', signal });
  const abort = new AbortController();
  const first = post(abort.signal).catch(() => 'aborted');
  await vi.waitFor(() => expect(app.runs(key)).toBe(1), { timeout: 10_000 });
  abort.abort();
  expect(await first).toBe('aborted');
  await app.left(key);
  return () => post();
}

describe.each(['express', 'koa', 'fastify'] as const)('%s, transactional, on Postgres: a client that left', (framework) => {
  it('a handler that finishes soon after: its writes commit with its answer, and the retry gets the replay (one row, one run)', async () => {
    const app = await start(framework);
    try {
      const key = randomUUID();
      const post = await leaveWhileRunning(app, key);
      app.finish(key);
      const retry = await vi.waitFor(
        async () => {
          const reply = await post();
          expect(reply.status).not.toBe(409);
          return reply;
        },
        { timeout: 10_000, interval: 50 },
      );
      expect([retry.status, retry.headers.get('idempotent-replayed'), await retry.json()]).toEqual([201, 'true', { status: 201 }]);
      expect(app.runs(key)).toBe(1);
      expect(await count(key)).toBe(1);
    } finally {
      await app.close();
    }
  });

  it('a handler that never finishes: rolled back and freed about a lease later; the retry runs on a clean slate (one row)', async () => {
    const app = await start(framework);
    try {
      const key = randomUUID();
      const post = await leaveWhileRunning(app, key);
      const retry = await vi.waitFor(
        async () => {
          const reply = await post();
          expect(reply.status).toBe(201);
          return reply;
        },
        { timeout: 4 * LEASE_MS, interval: 100 },
      );
      expect(retry.headers.get('idempotent-replayed')).toBeNull();
      expect(app.runs(key)).toBe(2);
      expect(await count(key)).toBe(1);
      app.finish(key); // the hung first run, let go at last: nothing of it may land
      await new Promise((resolve) => setTimeout(resolve, 200));
      expect(await count(key)).toBe(1);
    } finally {
      await app.close();
    }
  });
});
