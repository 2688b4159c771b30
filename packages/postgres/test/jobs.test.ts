/**
 * `idempotentTransaction()` (core) on the real store: what a job's caller gets when its
 * transaction does not commit. Several processes are in packages/reliability `jobs.test.ts`; here
 * a stall is made in one process: the job blocks the event loop past its lease, so no renewal
 * goes out, and a second wrapper on its own pool takes the key over meanwhile.
 */
import { randomUUID } from 'node:crypto';
import { createIdempotencyEngine, FingerprintMismatchError, idempotent, idempotentTransaction, RequestInProgressError, ResponseNotReplayableError, scopedKey, TransactionAbortedError } from '@idemkit/core';
import pg from 'pg';
import { afterAll, beforeAll, expect, it, vi } from 'vitest';
import { createPostgresStore, pgTransaction, type PostgresStore } from '../src/index.js';
import { bytes, openSchema, type TestSchema } from './helpers.js';

// Long enough that a begin on a loaded machine (two test packages and CI on two cores) answers
// within it: one answering after a whole lease is a 503 by design, and at 300 ms it flaked.
const LEASE_MS = 1_000;
/** The taker's: it is not the one stalled, so nothing here waits for it to end. */
const TAKER_LEASE_MS = 30_000;
let db: TestSchema;
let charges: string;
/** A second store on a pool of its own: the "other worker". */
let otherPool: pg.Pool;
let store: PostgresStore;
let other: PostgresStore;

interface Order {
  readonly id: string;
  readonly cents: number;
}

beforeAll(async () => {
  db = await openSchema();
  store = createPostgresStore({ pool: db.pool, schema: db.schema });
  await store.migrate();
  otherPool = new pg.Pool({ connectionString: db.url, max: 5 });
  other = createPostgresStore({ pool: otherPool, schema: db.schema });
  charges = db.table('charges');
  await db.pool.query(`CREATE TABLE ${charges} (order_id text NOT NULL, cents int NOT NULL)`);
});

afterAll(async () => {
  await otherPool.end();
  await db.drop();
});

const chargesOf = async (orderId: string) =>
  (await db.pool.query<{ cents: number }>(`SELECT cents FROM ${charges} WHERE order_id = $1`, [orderId])).rows.map((r) => r.cents);

/** Holds the event loop: no timer, no renewal, no I/O, as a long GC pause or a frozen VM would. */
function stall(ms: number): void {
  const until = performance.now() + ms;
  while (performance.now() < until);
}

/** The options every wrapper here shares; the result type comes from each job. */
const options = (on: PostgresStore, leaseMs = LEASE_MS) => ({
  store: on,
  name: 'charge',
  key: (order: Order) => order.id,
  leaseMs,
  logger: false as const,
});

const insert = (tx: pg.PoolClient, order: Order) => tx.query(`INSERT INTO ${charges} (order_id, cents) VALUES ($1, $2)`, [order.id, order.cents]);

it('a stalled job whose key a call with other arguments took over rejects with FingerprintMismatchError, and its charge rolls back', async () => {
  const id = `o-${randomUUID()}`;
  const taker = idempotentTransaction(async (tx, order: Order) => {
    await insert(tx, order);
    return { charged: order.cents };
  }, options(other, TAKER_LEASE_MS));
  let taken: Promise<{ charged: number }> | undefined;
  const stalled = idempotentTransaction(async (tx, order: Order) => {
    await insert(tx, order);
    setTimeout(() => (taken = taker({ id, cents: 999 })), 0);
    stall(LEASE_MS * 2 + 100);
    await new Promise((r) => setTimeout(r, 0));
    await taken; // the other call took the key over and committed
    return { charged: order.cents };
  }, options(store));

  await expect(stalled({ id, cents: 100 })).rejects.toBeInstanceOf(FingerprintMismatchError);
  expect(await taken).toEqual({ charged: 999 });
  expect(await chargesOf(id)).toEqual([999]);
});

it('a stalled job whose key was taken over by a call still running rejects with RequestInProgressError; the taker\'s charge is the one', async () => {
  const id = `o-${randomUUID()}`;
  let open: () => void = () => undefined;
  const gate = new Promise<void>((resolve) => (open = resolve));
  let takerRuns = 0;
  const taker = idempotentTransaction(async (tx, order: Order) => {
    takerRuns++;
    await insert(tx, order);
    await gate;
    return { charged: order.cents };
  }, options(other, TAKER_LEASE_MS));
  let taken: Promise<{ charged: number }> | undefined;
  const stalled = idempotentTransaction(async (tx, order: Order) => {
    await insert(tx, order);
    setTimeout(() => (taken = taker(order)), 0);
    stall(LEASE_MS * 2 + 100);
    while (takerRuns === 0) await new Promise((r) => setTimeout(r, 5)); // the taker is inside its job
    return { charged: order.cents };
  }, options(store));

  const error = await stalled({ id, cents: 100 }).catch((e: unknown) => e);
  expect(error).toBeInstanceOf(RequestInProgressError);
  expect((error as Error).message).toMatch(/another call took the key over; fn's writes were rolled back/);
  open();
  expect(await taken).toEqual({ charged: 100 });
  expect(await chargesOf(id)).toEqual([100]); // one row: the taker's; the stalled one rolled back
  expect(await stalled({ id, cents: 100 })).toEqual({ charged: 100 }); // and it replays now
});

it('a result over maxBodyBytes commits the charge with a marker: the first caller gets its result, later calls ResponseNotReplayableError', async () => {
  const id = `o-${randomUUID()}`;
  let runs = 0;
  const charge = idempotentTransaction(async (tx, order: Order) => {
    runs++;
    await insert(tx, order);
    return { charged: order.cents, receipt: 'x'.repeat(200) };
  }, { ...options(store), maxBodyBytes: 100 });

  expect(await charge({ id, cents: 100 })).toMatchObject({ charged: 100 });
  await expect(charge({ id, cents: 100 })).rejects.toBeInstanceOf(ResponseNotReplayableError);
  expect(runs).toBe(1);
  expect(await chargesOf(id)).toEqual([100]);
});

it('the same through the engine (HTTP transactional mode): the stalled request is answered 422, not the other request\'s answer', async () => {
  const engine = createIdempotencyEngine({ store, transactional: true, leaseMs: LEASE_MS, logger: false });
  const otherEngine = createIdempotencyEngine({ store: other, transactional: true, leaseMs: LEASE_MS, logger: false });
  const id = randomUUID();
  const request = (body: unknown) => ({ method: 'POST', path: '/charges', headers: { 'idempotency-key': `k-${id}` }, body });
  const first = await engine.decide(request({ cents: 100 }));
  if (first.kind !== 'run') throw new Error(first.kind);
  await insert(pgTransaction(first.lease.context), { id, cents: 100 });
  stall(LEASE_MS * 2 + 100);

  const second = await otherEngine.decide(request({ cents: 999 }));
  if (second.kind !== 'run') throw new Error(second.kind);
  expect(second.lease.context.tookOver).toBe(true);
  await insert(pgTransaction(second.lease.context), { id, cents: 999 });
  expect(await second.lease.commit({ status: 201, headers: [], body: bytes('charged 999') })).toBe(true);

  expect(await first.lease.commit({ status: 201, headers: [], body: bytes('charged 100') })).toBe(false);
  expect(first.lease.replacement?.status).toBe(422);
  expect(JSON.parse(Buffer.from(first.lease.replacement!.body).toString())).toMatchObject({ code: 'ERR_IDEMKIT_FINGERPRINT_MISMATCH' });
  expect(await chargesOf(id)).toEqual([999]);
});

it('a result that cannot be serialised rolls the charge back and frees the key: a fixed retry charges once', async () => {
  const id = `o-${randomUUID()}`;
  let broken = true;
  const charge = idempotentTransaction(async (tx, order: Order) => {
    await insert(tx, order);
    return { charged: broken ? BigInt(order.cents) : order.cents };
  }, options(store));

  await expect(charge({ id, cents: 100 })).rejects.toThrow(/could not be serialised.*rolled back/);
  expect(await chargesOf(id)).toEqual([]);
  broken = false;
  expect(await charge({ id, cents: 100 })).toEqual({ charged: 100 });
  expect(await chargesOf(id)).toEqual([100]);
});

it('a job that caught a failed statement rejects with TransactionAbortedError, not a store outage, and nothing commits', async () => {
  const id = `o-${randomUUID()}`;
  let fail = true;
  const charge = idempotentTransaction(async (tx, order: Order) => {
    await insert(tx, order);
    if (fail) await tx.query('SELECT 1/0').catch(() => undefined); // caught, but the transaction is aborted now
    return { charged: order.cents };
  }, options(store));

  const error = await charge({ id, cents: 100 }).catch((e: unknown) => e);
  expect(error).toBeInstanceOf(TransactionAbortedError);
  expect((error as Error).message).toMatch(/nothing was committed, and the key is free again.*SAVEPOINT/);
  expect(await chargesOf(id)).toEqual([]);
  fail = false;
  expect(await charge({ id, cents: 100 })).toEqual({ charged: 100 }); // the key was freed
  expect(await chargesOf(id)).toEqual([100]);
});

it('a job that committed its transaction itself and then threw rejects only once its 410 marker is stored, though the store failed that write at first', async () => {
  const id = `o-${randomUUID()}`;
  const seen: string[] = [];
  const locker = await db.pool.connect();
  try {
    const charge = idempotentTransaction(
      async (tx, order: Order) => {
        await insert(tx, order);
        await tx.query('COMMIT'); // its helper committed the charge: fn must never run again for this key
        // Another session holds the record's row: the 410 marker's write waits on it past storeTimeoutMs.
        await locker.query('BEGIN');
        await locker.query(`SELECT 1 FROM ${store.table} WHERE key = $1 FOR UPDATE`, [scopedKey(undefined, order.id)]);
        throw new Error('failed after its commit');
      },
      {
        ...options(store, 10_000),
        storeTimeoutMs: 300,
        onEvent: (e) => {
          if (e.type === 'store-error' && e.operation === 'complete') seen.push('store-error complete');
          if (e.type === 'completed') seen.push(`completed ${e.stored} ${e.status}`);
        },
      },
    );
    const call = charge({ id, cents: 100 }).then(
      () => seen.push('resolved'),
      (error: Error) => seen.push(`rejected ${error.message}`),
    );
    await vi.waitFor(() => expect(seen).toContain('store-error complete'), { timeout: 10_000, interval: 10 });
    await locker.query('COMMIT');
    await call;
    // The caller (a consumer that nacks, a script that exits) hears of the failure only once a
    // redelivery is sure to get 410 instead of charging again.
    expect(seen).toEqual(['store-error complete', 'completed true 410', 'rejected failed after its commit']);
    await expect(charge({ id, cents: 100 })).rejects.toBeInstanceOf(ResponseNotReplayableError);
    expect(await chargesOf(id)).toEqual([100]);
  } finally {
    locker.release();
  }
});

it('a job call whose completion is being retried settles within the store deadline when the store is closed (a worker shutting down), not when its 30 s lease runs out', async () => {
  const id = `o-${randomUUID()}`;
  // The store owns its pool, as one made from a connection string: close() ends it.
  const closing = createPostgresStore({ connectionString: db.url, schema: db.schema });
  const seen: string[] = [];
  const locker = await db.pool.connect();
  let closed: Promise<void> | undefined;
  try {
    const charge = idempotent(
      async (order: Order) => {
        // Another session holds the record's row: the completion (and the renewals) wait on it past storeTimeoutMs.
        await locker.query('BEGIN');
        await locker.query(`SELECT 1 FROM ${closing.table} WHERE key = $1 FOR UPDATE`, [scopedKey(undefined, order.id)]);
        return { charged: order.cents };
      },
      {
        store: closing,
        name: 'close-charge',
        key: (order) => order.id,
        leaseMs: 30_000,
        storeTimeoutMs: 300,
        logger: false,
        onEvent: (e) => {
          if (e.type === 'store-error' && e.operation === 'complete') seen.push('store-error complete');
          if (e.type === 'completed') seen.push(`completed ${e.stored}`);
          if (e.type === 'lease-lost') seen.push(`lease-lost ${e.operation}`);
        },
      },
    );
    const call = charge({ id, cents: 100 });
    await vi.waitFor(() => expect(seen).toContain('store-error complete'), { timeout: 10_000, interval: 10 });
    const closedAt = performance.now();
    closed = closing.close();
    // fn ran: the caller gets its result, and hears it was not stored. Before, it waited until
    // the lease ran out (30 s), and a worker's process with it.
    expect(await call).toEqual({ charged: 100 });
    expect(performance.now() - closedAt).toBeLessThan(3_000);
    expect(seen.filter((s) => !s.startsWith('store-error'))).toEqual(['completed false', 'lease-lost complete']);
  } finally {
    await locker.query('ROLLBACK');
    locker.release();
    await closed;
  }
});
