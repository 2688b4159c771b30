import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { createIdempotencyEngine, scopedKey, type Decision, type IdempotencyEngine, type IdempotencyEvent, type IncomingRequest, type Lease } from '@idemkit/core';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { createPostgresStore, pgTransaction, type PostgresStore } from '../src/index.js';
import { answerHoldingProxy } from '@idemkit/test-services';
import { bytes, openSchema, opensReadOnlyWhile, type TestSchema } from './helpers.js';

let db: TestSchema;
let store: PostgresStore;
let orders: string;

beforeAll(async () => {
  db = await openSchema();
  store = createPostgresStore({ pool: db.pool, schema: db.schema });
  await store.migrate();
  orders = db.table('orders');
  await db.pool.query(`CREATE TABLE ${orders} (id serial PRIMARY KEY, ref text NOT NULL)`);
});

afterAll(async () => {
  await db.drop();
});

const key = (): string => `k:${randomUUID()}`;
/** The store's key for an engine request with key `k` (no scope). */
const recordOf = (k: string): string => scopedKey(undefined, k);
const ok = { status: 201, headers: [['content-type', 'text/plain']] as const, body: bytes('created') };

async function rowsFor(ref: string): Promise<number> {
  const { rows } = await db.pool.query<{ n: number }>(`SELECT count(*)::int AS n FROM ${orders} WHERE ref = $1`, [ref]);
  return rows[0]?.n ?? -1;
}

/** Clients checked out of the pool right now (every path must give them back). */
const checkedOut = (pool: pg.Pool): number => pool.totalCount - pool.idleCount;

/** A claimed key's lease token and the transaction its handler would get (the flow the engine drives). */
async function claimedTransaction(k: string) {
  const first = await store.begin(k, 'fp', 30_000);
  if (first.kind !== 'acquired') throw new Error('expected acquired');
  return { token: first.token, tx: await store.beginTransaction() };
}

describe('store transactions (the flow the engine drives)', () => {
  it('handler inserts then throws → rollback + release: no row, no record; the retry commits exactly one row', async () => {
    const k = key();
    const ref = randomUUID();
    const { token, tx } = await claimedTransaction(k);
    await tx.client.query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref]);
    // The handler throws: the engine rolls back, then releases the key.
    await tx.rollback();
    expect(await store.release(k, token)).toBe(true);
    expect(await rowsFor(ref)).toBe(0);
    expect(await store.get(k)).toBeUndefined();

    const retry = await store.begin(k, 'fp', 30_000);
    if (retry.kind !== 'acquired') throw new Error('expected acquired');
    const tx2 = await store.beginTransaction();
    await tx2.client.query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref]);
    // Uncommitted: nobody else sees the row yet.
    expect(await rowsFor(ref)).toBe(0);
    expect(await tx2.complete(k, retry.token, ok, 60_000)).toBe(true);
    await tx2.rollback(); // safe after complete
    expect(await rowsFor(ref)).toBe(1);
    const replay = await store.begin(k, 'fp', 30_000);
    expect(replay).toMatchObject({ kind: 'existing', record: { state: 'completed', response: { status: 201 } } });
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('complete with a stale token after a takeover rolls the stale writes back and returns false', async () => {
    const k = key();
    const ref = randomUUID();
    const stale = await store.begin(k, 'fp', 150);
    if (stale.kind !== 'acquired') throw new Error('expected acquired');
    const tx = await store.beginTransaction();
    await tx.client.query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref]);
    await vi.waitFor(async () => expect(await store.get(k)).toBeUndefined(), { timeout: 5_000, interval: 20 });
    const next = await store.begin(k, 'fp', 30_000);
    expect(next).toMatchObject({ kind: 'acquired', tookOver: true });
    expect(await tx.complete(k, stale.token, ok, 60_000)).toBe(false);
    expect(await rowsFor(ref)).toBe(0);
    expect((await store.get(k))?.state).toBe('in_progress');
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('rollback() while complete() is still running wins: nothing commits', async () => {
    const k = key();
    const ref = randomUUID();
    const { token, tx } = await claimedTransaction(k);
    await tx.client.query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref]);
    // As when the engine's store deadline fires during complete and it rolls back.
    const completing = tx.complete(k, token, ok, 60_000);
    const rolling = tx.rollback();
    expect(await completing).toBe(false);
    await rolling;
    expect(await rowsFor(ref)).toBe(0);
    expect((await store.get(k))?.state).toBe('in_progress');
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('a failing COMMIT throws the driver error, commits nothing and still returns the client', async () => {
    const deferred = db.table('deferred_refs');
    await db.pool.query(`CREATE TABLE ${deferred} (ref text UNIQUE DEFERRABLE INITIALLY DEFERRED)`);
    const k = key();
    const { token, tx } = await claimedTransaction(k);
    // The duplicate is only detected at COMMIT (deferred constraint).
    await tx.client.query(`INSERT INTO ${deferred} (ref) VALUES ('dup'), ('dup')`);
    await expect(tx.complete(k, token, ok, 60_000)).rejects.toMatchObject({ code: '23505' });
    await tx.rollback(); // what the engine does after a failed complete: a no-op here
    expect((await store.get(k))?.state).toBe('in_progress');
    expect((await db.pool.query(`SELECT count(*)::int AS n FROM ${deferred}`)).rows[0]).toEqual({ n: 0 });
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('a handler that broke the transaction: complete rejects with TransactionAbortedError (the driver error as cause), rolls back, returns the client', async () => {
    const k = key();
    const { token, tx } = await claimedTransaction(k);
    await expect(tx.client.query('SELECT 1/0')).rejects.toMatchObject({ code: '22012' });
    await expect(tx.complete(k, token, ok, 60_000)).rejects.toMatchObject({ code: 'ERR_IDEMKIT_TRANSACTION_ABORTED', cause: { code: '25P02' } });
    expect((await store.get(k))?.state).toBe('in_progress');
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('a statement slipped in between the completion and COMMIT aborts it: COMMIT answers ROLLBACK, complete rejects', async () => {
    const k = key();
    const ref = randomUUID();
    const { token, tx } = await claimedTransaction(k);
    await tx.client.query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref]);
    // The client the handler gets refuses this (see below); the pool client itself does not, and
    // a failed statement there turns COMMIT into a rollback without an error from Postgres.
    const raw = Reflect.get(tx, 'raw') as pg.PoolClient;
    const completing = tx.complete(k, token, ok, 60_000);
    const failing = raw.query('SELECT 1/0').catch((error: unknown) => error);
    await expect(completing).rejects.toThrow(/COMMIT was answered with ROLLBACK/);
    expect(await failing).toMatchObject({ code: '22012' });
    expect(await rowsFor(ref)).toBe(0);
    expect((await store.get(k))?.state).toBe('in_progress');
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('the client refuses queries once the transaction is ending, in every call style, and still works before', async () => {
    const k = key();
    const { token, tx } = await claimedTransaction(k);
    expect((await tx.client.query<{ n: number }>('SELECT 1 AS n')).rows).toEqual([{ n: 1 }]);
    expect(tx.client).toBeInstanceOf(pg.Client);
    expect(await tx.complete(k, token, ok, 60_000)).toBe(true);
    const refused = /came after the handler answered/;
    await expect(tx.client.query('SELECT 1')).rejects.toThrow(refused);
    const viaCallback = await new Promise<unknown>((resolve) => {
      tx.client.query('SELECT 1', (error) => resolve(error));
    });
    expect(viaCallback).toBeInstanceOf(Error);
    expect(String(viaCallback)).toMatch(refused);
    expect(() => tx.client.query(new pg.Query('SELECT 1'))).toThrow(refused);
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('REPEATABLE READ handlers conflict with lease renewals (why the README asks for READ COMMITTED)', async () => {
    // A server or connection default is how a handler gets REPEATABLE READ: the store's BEGIN
    // asks for the transaction id, so SET TRANSACTION in the handler comes too late.
    const pool = new pg.Pool({ connectionString: db.url, max: 2, options: '-c default_transaction_isolation=repeatable\\ read' });
    const rr = createPostgresStore({ pool, schema: db.schema });
    try {
      const k = key();
      const first = await rr.begin(k, 'fp', 30_000);
      if (first.kind !== 'acquired') throw new Error('expected acquired');
      const tx = await rr.beginTransaction();
      expect(await rr.renew(k, first.token, 30_000)).toBe(true); // the engine's renewal timer
      await expect(tx.complete(k, first.token, ok, 60_000)).rejects.toMatchObject({ code: '40001' });
      expect(checkedOut(pool)).toBe(0);
    } finally {
      await pool.end();
    }
  });

  // Lease and TTL go by the completing statement's time, not the transaction's start (now()).
  it('a handler that stalls past its lease (nobody took over) cannot complete; a timely one gets its TTL from completion', async () => {
    const late = key();
    const claim = await store.begin(late, 'fp', 300);
    if (claim.kind !== 'acquired') throw new Error('expected acquired');
    const tx = await store.beginTransaction();
    await tx.client.query('SELECT 1');
    await new Promise((resolve) => setTimeout(resolve, 800)); // the handler's work, past the 300 ms lease
    expect(await tx.complete(late, claim.token, ok, 5_000)).toBe(false);

    const timely = key();
    const { token, tx: tx2 } = await claimedTransaction(timely);
    await tx2.client.query('SELECT 1');
    await new Promise((resolve) => setTimeout(resolve, 800)); // the same work, well inside the lease
    const completedAt = Date.now();
    expect(await tx2.complete(timely, token, ok, 5_000)).toBe(true);
    const record = await store.get(timely);
    // Within a round trip of completion + 5 s; counted from BEGIN it would be ~800 ms early.
    expect(record?.expiresAt).toBeGreaterThan(completedAt + 5_000 - 300);
  });

  it('complete twice is refused; the transaction is single-use', async () => {
    const k = key();
    const { token, tx } = await claimedTransaction(k);
    expect(await tx.complete(k, token, ok, 60_000)).toBe(true);
    await expect(tx.complete(k, token, ok, 60_000)).rejects.toThrow(/already completed or rolled back/);
  });
});

describe('a transaction on a read-only connection (a failover behind one address) whose handler only read, then threw', () => {
  it('is not given back to the pool: the next claim, on a pool of 1, gets a writable connection', async () => {
    const pool = new pg.Pool({ connectionString: db.url, max: 1 });
    pool.on('error', () => undefined);
    const own = createPostgresStore({ pool, schema: db.schema });
    let readOnly = true;
    opensReadOnlyWhile(pool, () => readOnly);
    try {
      const tx = await own.beginTransaction();
      await tx.client.query(`SELECT count(*) FROM ${orders}`); // a read works on a read-only session
      await tx.rollback(); // the handler threw: the ROLLBACK itself succeeds
      readOnly = false; // the address now leads to the writable primary only
      // Before: the ROLLBACK gave the read-only connection back, the only one in the pool, and
      // the next request's claim failed on it with 25006 (a 503), as did every write after it.
      const next = await own.begin(key(), 'fp', 30_000);
      expect(next.kind).toBe('acquired');
      expect(checkedOut(pool)).toBe(0);
    } finally {
      await pool.end();
    }
  });
});

describe('pgTransaction()', () => {
  it('returns the client of a transactional context', async () => {
    const tx = await store.beginTransaction();
    expect(pgTransaction({ transaction: tx.client })).toBe(tx.client);
    await tx.rollback();
  });

  it('throws a clear error outside transactional mode', () => {
    expect(() => pgTransaction({ transaction: undefined })).toThrow(/Enable `transactional: true`/);
    expect(() => pgTransaction(undefined)).toThrow(/not running under an idempotency key/);
    expect(() => pgTransaction(null)).toThrow(expect.objectContaining({ code: 'ERR_IDEMKIT_NOT_TRANSACTIONAL' }));
  });
});

describe("a pool with its own type parsers (everything kept as text, as an app's `types` may)", () => {
  const request = (k: string): IncomingRequest => ({ method: 'POST', path: '/orders', headers: { 'idempotency-key': k }, body: { a: 1 } });

  it.each([false, true])('replays the stored answer, never runs a completed key again (transactional: %s)', async (transactional) => {
    const asText: pg.CustomTypesConfig = { getTypeParser: (() => (value: string) => value) as pg.CustomTypesConfig['getTypeParser'] };
    const pool = new pg.Pool({ connectionString: db.url, max: 4, types: asText });
    pool.on('error', () => undefined);
    try {
      const s = createPostgresStore({ pool, schema: db.schema });
      await s.migrate();
      const engine = createIdempotencyEngine({ store: s, transactional, logger: false });
      const k = key();
      const ref = randomUUID();
      let runs = 0;
      const first = await engine.decide(request(k));
      if (first.kind !== 'run') throw new Error(`expected run, got ${first.kind}`);
      runs++;
      if (transactional) await pgTransaction(first.lease.context).query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref]);
      const body = new Uint8Array([0, 0xff, 0x7b, 0x22]);
      expect(await first.lease.commit({ status: 201, headers: [['content-type', 'application/octet-stream'], ['location', '/orders/1']], body })).toBe(true);
      if (transactional) expect(await rowsFor(ref)).toBe(1);
      // Before: bool as text ('f' is truthy) made the completed key "acquired" again (a second
      // run; in transactional mode every answer counted as a transaction the handler ended),
      // jsonb as text broke the headers, bytea as text replayed an empty body.
      const again = await engine.decide(request(k));
      expect(again.kind).toBe('replay');
      if (again.kind !== 'replay') return;
      expect(again.response.status).toBe(201);
      expect([...again.response.body]).toEqual([...body]);
      expect(again.response.headers).toEqual(expect.arrayContaining([['location', '/orders/1']]));
      expect(runs).toBe(1);
    } finally {
      await pool.end();
    }
  });
});

describe('a COMMIT slower than queryTimeoutMs (a deferred trigger at work)', () => {
  it('is not taken for a rollback: the server committed it, so the completion stands and the retry replays', async () => {
    const slow = db.table('slow_orders');
    const fn = `"${db.schema}".slow_commit`;
    await db.pool.query(`CREATE TABLE ${slow} (id serial PRIMARY KEY, ref text NOT NULL)`);
    await db.pool.query(`CREATE FUNCTION ${fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$`);
    await db.pool.query(`CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON ${slow} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ${fn}()`);
    const s = createPostgresStore({ pool: db.pool, schema: db.schema, queryTimeoutMs: 500 });
    const engine = createIdempotencyEngine({ store: s, transactional: true, logger: false, storeTimeoutMs: 5_000 });
    const request = (k: string): IncomingRequest => ({ method: 'POST', path: '/orders', headers: { 'idempotency-key': k }, body: { a: 1 } });
    const k = key();
    const ref = randomUUID();
    const first = await engine.decide(request(k));
    if (first.kind !== 'run') throw new Error(`expected run, got ${first.kind}`);
    await pgTransaction(first.lease.context).query(`INSERT INTO ${slow} (ref) VALUES ($1)`, [ref]);
    // Before: the COMMIT's read timeout counted as a rollback, and the client was told another
    // request had taken over (409) while its order was in fact committed.
    expect(await first.lease.commit({ status: 201, headers: [['content-type', 'text/plain']], body: bytes('created') })).toBe(true);
    expect(first.lease.replacement).toBeNull();
    const { rows } = await db.pool.query<{ n: number }>(`SELECT count(*)::int AS n FROM ${slow} WHERE ref = $1`, [ref]);
    expect(rows[0]?.n).toBe(1);
    expect((await engine.decide(request(k))).kind).toBe('replay');
    expect(checkedOut(db.pool)).toBe(0);
  }, 20_000);
});

describe('a completion that waits on a lock past queryTimeoutMs', () => {
  it('is ended on the server too: no backend is left behind waiting (with the handler\'s row locks) once its fate was asked', async () => {
    const s = createPostgresStore({ pool: db.pool, schema: db.schema, queryTimeoutMs: 500 });
    const engine = createIdempotencyEngine({ store: s, transactional: true, logger: false, storeTimeoutMs: 5_000 });
    const k = key();
    const first = await engine.decide({ method: 'POST', path: '/orders', headers: { 'idempotency-key': k }, body: { a: 1 } });
    if (first.kind !== 'run') throw new Error(`expected run, got ${first.kind}`);
    await pgTransaction(first.lease.context).query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [randomUUID()]);
    // Another session locks the record: the completion's UPDATE waits behind it.
    const locker = await db.pool.connect();
    try {
      await locker.query('BEGIN');
      await locker.query(`SELECT 1 FROM ${s.table} WHERE key = $1 FOR UPDATE`, [recordOf(k)]);
      const lockerPid = (locker as unknown as { processID: number }).processID;
      const blocked = async (): Promise<number> =>
        (await db.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))', [lockerPid])).rows[0]?.n ?? -1;
      const committing = first.lease.commit({ status: 201, headers: [], body: bytes('created') });
      await vi.waitFor(async () => expect(await blocked()).toBeGreaterThan(0), { timeout: 2_000, interval: 20 });
      // Before: that backend went on waiting (outside the pool's max, holding the handler's rows)
      // until the lock was given up, whenever that was.
      await vi.waitFor(async () => expect(await blocked()).toBe(0), { timeout: 6_000, interval: 50 });
      await locker.query('ROLLBACK');
      expect(await committing).toBe(false);
    } finally {
      locker.release();
    }
  }, 20_000);
});

describe("the transaction's own statements under a network black hole (answers that never come)", () => {
  it('time out and destroy their connection: nothing commits, the key is free, the pool keeps serving', async () => {
    const target = new URL(db.url);
    const proxy = await answerHoldingProxy(target.hostname, Number(target.port || 5432));
    const through = new URL(db.url);
    through.hostname = '127.0.0.1';
    through.port = String(proxy.port);
    // One connection: before, the held statement kept it for good (the transaction's client had
    // no read timeout), the key stayed held, and every later request was a 503 or a 409.
    const pool = new pg.Pool({ connectionString: through.toString(), max: 1 });
    pool.on('error', () => undefined);
    const s = createPostgresStore({ pool, schema: db.schema, queryTimeoutMs: 500 });
    const engine = createIdempotencyEngine({ store: s, transactional: true, logger: false, storeTimeoutMs: 2_000 });
    const request = (k: string): IncomingRequest => ({ method: 'POST', path: '/orders', headers: { 'idempotency-key': k }, body: { a: 1 } });
    const runOnce = async (k: string, ref: string): Promise<Lease> => {
      const decision = await engine.decide(request(k));
      if (decision.kind !== 'run') throw new Error(`expected run, got ${decision.kind}`);
      await pgTransaction(decision.lease.context).query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref]);
      return decision.lease;
    };
    try {
      const k = key();
      const ref = randomUUID();
      const first = await runOnce(k, ref);
      proxy.holdAnswers(); // the open connection's answers are lost from here on
      expect(await first.commit({ status: 201, headers: [['content-type', 'text/plain']], body: bytes('created') })).toBe(false);
      // The completion timed out, its connection was closed, so the server rolled it back: the
      // client is told to retry, and the retry runs (over a new connection) and commits.
      expect(first.replacement?.status).toBe(503);
      expect(await rowsFor(ref)).toBe(0);
      const retry = await runOnce(k, ref);
      expect(await retry.commit({ status: 201, headers: [['content-type', 'text/plain']], body: bytes('created') })).toBe(true);
      expect(await rowsFor(ref)).toBe(1);
      expect((await engine.decide(request(k))).kind).toBe('replay');
      expect(pool.totalCount - pool.idleCount).toBe(0);
    } finally {
      await pool.end();
      await proxy.close();
    }
  }, 20_000);
});

describe('through createIdempotencyEngine({ store, transactional: true })', () => {
  const request = (k: string, ref: string): IncomingRequest => ({
    method: 'POST',
    path: '/orders',
    headers: { 'idempotency-key': k },
    body: { ref },
  });

  async function run(decision: Decision, handler: (lease: Lease) => Promise<{ status: number; text: string }>) {
    if (decision.kind !== 'run') throw new Error(`expected run, got ${decision.kind}`);
    try {
      const out = await handler(decision.lease);
      return decision.lease.commit({ status: out.status, headers: [['content-type', 'text/plain']], body: bytes(out.text) });
    } catch (error) {
      await decision.lease.abandon('handler-threw');
      throw error;
    }
  }

  it("onStoreError: 'pass' is refused at setup: it ran the handler without a transaction, so every store outage was a 500 from pgTransaction()", () => {
    // Seen through Express, Koa and Fastify with the store's server gone: pgTransaction() threw
    // "not running under an idempotency key (method not covered, …)" for every request.
    expect(() => createIdempotencyEngine({ store, transactional: true, onStoreError: 'pass', logger: false })).toThrow(
      expect.objectContaining({ code: 'ERR_IDEMKIT_OPTION_INVALID', message: expect.stringMatching(/no transaction for the handler/) }),
    );
    expect(createIdempotencyEngine({ store, transactional: true, onStoreError: 'fail', logger: false }).options.onStoreError).toBe('fail');
  });

  it('throw → no row, no record; retry commits one row; the next retry replays without running', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    const k = key();
    const ref = randomUUID();
    let runs = 0;
    const handler = (fail: boolean) => async (lease: Lease) => {
      runs++;
      const tx = pgTransaction(lease.context);
      await tx.query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref]);
      if (fail) throw new Error('boom');
      return { status: 201, text: `order ${ref}` };
    };

    await expect(run(await engine.decide(request(k, ref)), handler(true))).rejects.toThrow('boom');
    expect(await rowsFor(ref)).toBe(0);
    expect(await store.get(recordOf(k))).toBeUndefined();

    expect(await run(await engine.decide(request(k, ref)), handler(false))).toBe(true);
    expect(await rowsFor(ref)).toBe(1);

    const replay = await engine.decide(request(k, ref));
    expect(replay.kind).toBe('replay');
    if (replay.kind === 'replay') expect(new TextDecoder().decode(replay.response.body)).toBe(`order ${ref}`);
    expect(runs).toBe(2);
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('a non-storable status rolls the business writes back and frees the key', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    const k = key();
    const ref = randomUUID();
    const stored = await run(await engine.decide(request(k, ref)), async (lease) => {
      await pgTransaction(lease.context).query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref]);
      return { status: 503, text: 'try later' };
    });
    expect(stored).toBe(false);
    expect(await rowsFor(ref)).toBe(0);
    const again = await engine.decide(request(k, ref));
    expect(again.kind).toBe('run');
    if (again.kind === 'run') await again.lease.abandon('client-gone');
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('20 concurrent requests with one key: the business row is written exactly once', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false, concurrency: 'wait', waitTimeoutMs: 10_000 });
    const k = key();
    const ref = randomUUID();
    const outcomes = await Promise.all(
      Array.from({ length: 20 }, async () => {
        const decision = await engine.decide(request(k, ref));
        if (decision.kind === 'replay') return 'replay';
        await run(decision, async (lease) => {
          await pgTransaction(lease.context).query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref]);
          return { status: 201, text: 'once' };
        });
        return 'ran';
      }),
    );
    expect(outcomes.filter((o) => o === 'ran')).toHaveLength(1);
    expect(outcomes.filter((o) => o === 'replay')).toHaveLength(19);
    expect(await rowsFor(ref)).toBe(1);
  });

  /** A new key whose handler has inserted its row in the transaction and not answered yet. */
  async function inserted(engine: IdempotencyEngine) {
    const k = key();
    const ref = randomUUID();
    const decision = await engine.decide(request(k, ref));
    if (decision.kind !== 'run') throw new Error(`expected run, got ${JSON.stringify(decision)}`);
    const tx = pgTransaction(decision.lease.context);
    await tx.query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref]);
    return { k, ref, decision, tx };
  }

  it('a handler that caught the failure it expected (a unique violation) and answered 422: that answer goes out, unstored', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    const unique = db.table('emails');
    await db.pool.query(`CREATE TABLE IF NOT EXISTS ${unique} (email text PRIMARY KEY)`);
    const email = `${randomUUID()}@example.com`;
    await db.pool.query(`INSERT INTO ${unique} (email) VALUES ($1)`, [email]);
    const { k, ref, decision, tx } = await inserted(engine);
    // "Email taken": the handler expected this and answers 422; the transaction is aborted.
    await expect(tx.query(`INSERT INTO ${unique} (email) VALUES ($1)`, [email])).rejects.toMatchObject({ code: '23505' });
    const { lease } = decision;
    expect(await lease.commit({ status: 422, headers: [], body: bytes('email taken') })).toBe(false);
    // Not a 503: the client would retry it and fail the same way forever. The 422 claims no
    // writes, and none were made.
    expect(lease.replacement).toBeNull();
    expect(await rowsFor(ref)).toBe(0);
    expect(await store.get(recordOf(k))).toBeUndefined();
    // (A 2xx from an aborted transaction is still replaced by the 503: the test below.)
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('a 4xx of a stalled holder whose key was taken over meanwhile: the winner’s stored answer goes out instead', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    const { k, ref, decision, tx } = await inserted(engine);
    await expect(tx.query('SELECT 1/0')).rejects.toMatchObject({ code: '22012' });
    // The holder stalled past its lease (simulated): another request takes the key and answers.
    await db.pool.query(`UPDATE ${db.table()} SET lease_expires_at = now() - interval '1 second', expires_at = now() - interval '1 second' WHERE key = $1`, [recordOf(k)]);
    const winner = await engine.decide(request(k, ref));
    if (winner.kind !== 'run') throw new Error(`expected run, got ${winner.kind}`);
    expect(winner.lease.tookOver).toBe(true);
    expect(await winner.lease.commit({ status: 201, headers: [], body: bytes('the winner') })).toBe(true);
    // The stale holder's 422 would contradict the 201 every retry gets.
    expect(await decision.lease.commit({ status: 422, headers: [], body: bytes('stale') })).toBe(false);
    expect(decision.lease.replacement?.status).toBe(201);
    expect(new TextDecoder().decode(decision.lease.replacement?.body)).toBe('the winner');
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('a handler that swallowed a failed statement: nothing commits, the key is free, the answer says retry', async () => {
    const events: IdempotencyEvent[] = [];
    const warn = vi.fn();
    const error = vi.fn();
    const engine = createIdempotencyEngine({ store, transactional: true, logger: { warn, error }, onEvent: (e) => events.push(e) });
    const { k, ref, decision, tx } = await inserted(engine);
    await expect(tx.query('SELECT 1/0')).rejects.toMatchObject({ code: '22012' });
    // The handler answers 201 anyway; its transaction is aborted, so nothing can commit.
    expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(false);
    // Not "another request took over" (a 409 for the rest of the lease): a 503 to retry now.
    expect(decision.lease.replacement?.status).toBe(503);
    expect(await rowsFor(ref)).toBe(0);
    expect(await store.get(recordOf(k))).toBeUndefined();
    const retry = await engine.decide(request(k, ref));
    expect(retry.kind).toBe('run');
    if (retry.kind === 'run') await retry.lease.abandon('client-gone');
    expect(checkedOut(db.pool)).toBe(0);
    // The application's error, not the store's: no store-error event (store alerts), a warning.
    expect(events.filter((e) => e.type === 'store-error')).toEqual([]);
    expect(error).not.toHaveBeenCalled();
    expect(warn).toHaveBeenCalledWith(expect.stringContaining('A statement the handler for key'));
  });

  /** A retry of `k` after its first run: whether the handler would run again, and what the client gets. */
  async function retryOf(engine: IdempotencyEngine, k: string, ref: string) {
    const retry = await engine.decide(request(k, ref));
    if (retry.kind === 'run') await retry.lease.abandon('client-gone');
    if (retry.kind !== 'replay') return { kind: retry.kind };
    const { status, body } = retry.response;
    if (status !== 410) return { kind: retry.kind, status };
    const problem = JSON.parse(new TextDecoder().decode(body)) as { reason: unknown; originalStatus: unknown };
    return { kind: retry.kind, status, reason: problem.reason, originalStatus: problem.originalStatus };
  }

  /** The retry of `k` runs the handler again, and its INSERT commits with its answer. */
  async function retryRunsAndCommits(engine: IdempotencyEngine, k: string, ref: string): Promise<void> {
    const retry = await engine.decide(request(k, ref));
    expect(retry.kind).toBe('run');
    if (retry.kind === 'run') {
      await pgTransaction(retry.lease.context).query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref]);
      expect(await retry.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(true);
    }
  }

  // A helper with its own BEGIN/COMMIT, called on the transaction client: its COMMIT commits
  // idemkit's transaction too (Postgres only warns about the nested BEGIN).
  async function withOwnTransaction(client: pg.PoolClient, work: () => Promise<unknown>): Promise<void> {
    await client.query('BEGIN');
    await work();
    await client.query('COMMIT');
  }

  it('a handler that commits the transaction itself: its row stays, its answer goes out, retries get 410 and never run it again', async () => {
    const error = vi.fn();
    const engine = createIdempotencyEngine({ store, transactional: true, logger: { warn: () => undefined, error } });
    const { k, ref, decision, tx } = await inserted(engine);
    await withOwnTransaction(tx, () => tx.query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [`${ref}-helper`]));

    expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(false);
    // Its writes did commit: the handler's own answer goes out, not "rolled back, retry".
    expect(decision.lease.replacement).toBeNull();
    expect(error).toHaveBeenCalledWith(expect.stringContaining('ended the transaction it was given (COMMIT or ROLLBACK'));
    expect(await rowsFor(ref)).toBe(1);
    expect(await rowsFor(`${ref}-helper`)).toBe(1);
    for (let i = 0; i < 2; i++) {
      expect(await retryOf(engine, k, ref)).toEqual({ kind: 'replay', status: 410, reason: 'transaction-ended', originalStatus: 201 });
    }
    expect(await rowsFor(ref)).toBe(1);
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('a handler that rolls the transaction back itself, then writes on in autocommit: caught, never run twice', async () => {
    const error = vi.fn();
    const engine = createIdempotencyEngine({ store, transactional: true, logger: { warn: () => undefined, error } });
    for (const ending of ['answer', 'throw'] as const) {
      const { k, ref, decision, tx } = await inserted(engine);
      await tx.query('ROLLBACK');
      // After the ROLLBACK the client is in autocommit: this row commits at once.
      await tx.query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref]);
      if (ending === 'answer') {
        expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(false);
        expect(decision.lease.replacement).toBeNull();
      } else {
        await decision.lease.abandon('handler-threw');
      }
      expect(await retryOf(engine, k, ref)).toMatchObject({ kind: 'replay', status: 410, reason: 'transaction-ended' });
      expect(await rowsFor(ref)).toBe(1);
    }
    expect(error).toHaveBeenCalledTimes(2);
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('release() on the transaction client is refused with a clear error, and the client still goes back once', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    const { k, ref, decision, tx } = await inserted(engine);
    expect(() => tx.release()).toThrow(/Do not release\(\) the transaction client/);
    expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(true);
    expect(await rowsFor(ref)).toBe(1);
    expect(await retryOf(engine, k, ref)).toEqual({ kind: 'replay', status: 201 });
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('a query after the answer (an audit row, say) is refused: it cannot slip into the COMMIT or outlive the transaction', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    const { k, ref, decision, tx } = await inserted(engine);
    // The handler answers, then writes once more without waiting: the answer starts the commit.
    const committing = decision.lease.commit({ status: 201, headers: [], body: bytes('created') });
    const audit = tx.query('INSERT INTO no_such_audit_table (ref) VALUES ($1)', [ref]);
    await expect(audit).rejects.toThrow(/came after the handler answered/);
    expect(await committing).toBe(true);
    expect(await rowsFor(ref)).toBe(1);
    expect(await retryOf(engine, k, ref)).toEqual({ kind: 'replay', status: 201 });

    // And once the client is back in the pool, a late write cannot land in whoever has it now.
    await expect(tx.query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref])).rejects.toThrow(/came after the handler answered/);
    expect(await rowsFor(ref)).toBe(1);
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('a lease left to lapse (a binding that lost its response) rolls back and returns its client when it runs out', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false, leaseMs: 400 });
    const { k, ref, decision, tx } = await inserted(engine);
    // A lock the handler holds in its transaction (a row it updated, say) until that ends.
    const lock = `SELECT pg_try_advisory_xact_lock(hashtext($1)) AS got`;
    expect((await tx.query<{ got: boolean }>(lock, [ref])).rows[0]?.got).toBe(true);
    // Express, after a handler threw once its head was out: nobody will end this transaction.
    decision.lease.letLapse();
    expect(checkedOut(db.pool)).toBe(1);
    await vi.waitFor(() => expect(checkedOut(db.pool)).toBe(0), { timeout: 5_000, interval: 20 });
    expect(await rowsFor(ref)).toBe(0);
    // The key is freed as the lease would have run out: the retry runs, the lapsed one's lock gone, and commits.
    const retry = await vi.waitFor(
      async () => {
        const decision = await engine.decide(request(k, ref));
        expect(decision.kind).toBe('run');
        return decision;
      },
      { timeout: 5_000, interval: 20 },
    );
    if (retry.kind !== 'run') return;
    expect(retry.lease.tookOver).toBe(false);
    const next = pgTransaction(retry.lease.context);
    expect((await next.query<{ got: boolean }>(lock, [ref])).rows[0]?.got).toBe(true);
    await next.query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref]);
    expect(await retry.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(true);
    expect(await rowsFor(ref)).toBe(1);
    // A late answer of the lapsed handler changes nothing.
    expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('late') })).toBe(false);
    expect(await retryOf(engine, k, ref)).toEqual({ kind: 'replay', status: 201 });
    // The lapsed lease's rollback or a last renewal may still hold its connection for a moment.
    await vi.waitFor(() => expect(checkedOut(db.pool)).toBe(0), { timeout: 5_000, interval: 20 });
  });

  it('a lapsing lease whose handler committed by itself gets its 410 marker (renewed until then, so the store takes it)', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false, leaseMs: 400 });
    const { k, ref, decision, tx } = await inserted(engine);
    await tx.query('COMMIT'); // the handler's helper ended the transaction: its row is in
    decision.lease.letLapse();
    const retry = await vi.waitFor(
      async () => {
        const answer = await retryOf(engine, k, ref);
        expect(answer.kind).toBe('replay');
        return answer;
      },
      { timeout: 5_000, interval: 20 },
    );
    expect(retry).toEqual({ kind: 'replay', status: 410, reason: 'transaction-ended', originalStatus: null });
    expect(await rowsFor(ref)).toBe(1);
    // A renewal begun just before the marker landed may still hold its connection for a moment.
    await vi.waitFor(() => expect(checkedOut(db.pool)).toBe(0), { timeout: 5_000, interval: 20 });
  });

  it('RESET ALL inside the transaction does not make it look ended: the answer is stored and replayed', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    const { k, ref, decision, tx } = await inserted(engine);
    await tx.query('RESET ALL');
    expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(true);
    expect(await rowsFor(ref)).toBe(1);
    expect(await retryOf(engine, k, ref)).toEqual({ kind: 'replay', status: 201 });
  });

  it('COMMIT, a new BEGIN and a failed statement: the aborted session cannot hide the COMMIT, retries get 410', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    for (const ending of ['answer', 'throw'] as const) {
      const { k, ref, decision, tx } = await inserted(engine);
      await tx.query('COMMIT');
      await tx.query('BEGIN');
      await expect(tx.query('SELECT 1/0')).rejects.toMatchObject({ code: '22012' });
      if (ending === 'answer') expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(false);
      else await decision.lease.abandon('handler-threw');
      expect(await retryOf(engine, k, ref)).toMatchObject({ kind: 'replay', status: 410, reason: 'transaction-ended' });
      expect(await rowsFor(ref)).toBe(1);
    }
    expect(checkedOut(db.pool)).toBe(0);
  });

  /** The record of `k` once completed, for outcomes settled after the answer went out (fails after 10 s). */
  const completedLater = (k: string) =>
    vi.waitFor(
      async () => {
        const record = await store.get(recordOf(k));
        expect(record?.state).toBe('completed');
        return record;
      },
      { timeout: 10_000, interval: 20 },
    );

  it('the handler COMMITs and the completion outlasts storeTimeoutMs (a lock elsewhere): the key is never freed for a second run', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false, storeTimeoutMs: 150 });
    const { k, ref, decision, tx } = await inserted(engine);
    await tx.query('COMMIT');
    // A migration, say, holds the record table while the completion runs.
    const locker = await db.pool.connect();
    try {
      await locker.query('BEGIN');
      await locker.query(`LOCK TABLE ${db.table('idempotency_keys')} IN ACCESS EXCLUSIVE MODE`);
      expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(false);
      // Not "rolled back": at this point nobody knows, and the retry gets the answer once it is known.
      expect(JSON.parse(new TextDecoder().decode(decision.lease.replacement?.body))).toMatchObject({
        status: 503,
        detail: expect.stringContaining('could not be confirmed in time'),
      });
    } finally {
      await locker.query('COMMIT');
      locker.release();
    }
    expect(await completedLater(k)).toMatchObject({ state: 'completed', response: { status: 410 } });
    expect(await retryOf(engine, k, ref)).toMatchObject({ kind: 'replay', status: 410, reason: 'transaction-ended' });
    expect(await rowsFor(ref)).toBe(1);
  });

  it('the handler COMMITs, leaves a query of its own blocked and throws: the key stays held past its lease until the rollback settles', async () => {
    const leaseMs = 900;
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false, storeTimeoutMs: 150, leaseMs });
    const { k, ref, decision, tx } = await inserted(engine);
    await tx.query('COMMIT');
    const blocker = await db.pool.connect();
    let stuck: Promise<unknown> | undefined;
    try {
      await blocker.query('BEGIN');
      await blocker.query(`LOCK TABLE ${orders} IN ACCESS EXCLUSIVE MODE`);
      // The handler gives up waiting on its own query and throws; the query stays queued on the client.
      stuck = tx.query(`SELECT count(*) FROM ${orders}`);
      const thrownAt = Date.now();
      await decision.lease.abandon('handler-threw');
      // Its outcome unknown, the key stays held, renewed: twice the lease later a retry still meets it.
      await new Promise((resolve) => setTimeout(resolve, thrownAt + 2 * leaseMs - Date.now()));
      // Asked by another engine (another app server), whose store calls are not held to 150 ms.
      const other = createIdempotencyEngine({ store, transactional: true, logger: false });
      expect(await other.decide(request(k, ref))).toMatchObject({ kind: 'problem', error: { status: 409 } });
    } finally {
      await blocker.query('COMMIT');
      blocker.release();
    }
    await stuck;
    expect(await completedLater(k)).toMatchObject({ state: 'completed', response: { status: 410 } });
    expect(await rowsFor(ref)).toBe(1);
  });

  it('COMMIT then a new BEGIN is still caught: the new transaction is rolled back, retries get 410', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    const { k, ref, decision, tx } = await inserted(engine);
    await tx.query('COMMIT');
    await tx.query('BEGIN');
    await tx.query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [`${ref}-after`]);
    expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(false);
    expect(await rowsFor(ref)).toBe(1);
    expect(await rowsFor(`${ref}-after`)).toBe(0);
    expect(await retryOf(engine, k, ref)).toMatchObject({ kind: 'replay', status: 410, reason: 'transaction-ended' });
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('a handler that commits itself and then throws: the key is not freed, so its row is not written twice', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    const { k, ref, decision, tx } = await inserted(engine);
    await tx.query('COMMIT');
    await decision.lease.abandon('handler-threw');
    expect(await rowsFor(ref)).toBe(1);
    expect(await retryOf(engine, k, ref)).toEqual({ kind: 'replay', status: 410, reason: 'transaction-ended', originalStatus: null });
    expect(await rowsFor(ref)).toBe(1);
    expect(checkedOut(db.pool)).toBe(0);
  });

  it('savepoints inside the transaction are fine: ROLLBACK TO SAVEPOINT keeps it, the answer is stored and replayed', async () => {
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    const { k, ref, decision, tx } = await inserted(engine);
    await tx.query('SAVEPOINT attempt');
    await tx.query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [`${ref}-undone`]);
    await tx.query('ROLLBACK TO SAVEPOINT attempt');
    expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(true);
    expect(await rowsFor(ref)).toBe(1);
    expect(await rowsFor(`${ref}-undone`)).toBe(0);
    expect(await retryOf(engine, k, ref)).toEqual({ kind: 'replay', status: 201 });
  });

  /** An engine on a pool of its own (a test that kills or reconfigures connections), ended after. */
  async function withOwnPool(
    config: pg.PoolConfig,
    run: (engine: IdempotencyEngine, own: PostgresStore, pool: pg.Pool) => Promise<void>,
    engineOptions: { storeTimeoutMs?: number; onEvent?: (event: IdempotencyEvent) => void } = {},
  ) {
    const pool = new pg.Pool({ connectionString: db.url, max: 2, ...config });
    // Backends terminated here surface as idle-client errors; the test asserts on queries.
    pool.on('error', () => undefined);
    const own = createPostgresStore({ pool, schema: db.schema });
    try {
      // Connected before the engine's first call: tests here give it a storeTimeoutMs of 150, which
      // a new connection's startup on a busy machine could eat by itself.
      await pool.query('SELECT 1');
      await run(createIdempotencyEngine({ store: own, transactional: true, logger: false, ...engineOptions }), own, pool);
      expect(checkedOut(pool)).toBe(0);
    } finally {
      await pool.end();
    }
  }

  /** As idle_in_transaction_session_timeout or a DBA would: the client's backend is gone once this returns. */
  async function killBackend(tx: pg.PoolClient): Promise<void> {
    const { rows } = await tx.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
    const ended = new Promise((resolve) => tx.once('end', resolve));
    await db.pool.query('SELECT pg_terminate_backend($1)', [rows[0]!.pid]);
    await ended;
  }

  it('idle_in_transaction_session_timeout ends the session while the handler waits: nothing commits, the key is free, the pool keeps serving', async () => {
    await withOwnPool({ options: '-c idle_in_transaction_session_timeout=300' }, async (engine) => {
      const { k, ref, decision, tx } = await inserted(engine);
      // The handler awaits something slow (a payment API) with the transaction open: the server
      // ends the session (FATAL 25P03) and rolls the INSERT back.
      await new Promise((resolve) => tx.once('end', resolve));
      expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(false);
      expect(decision.lease.replacement?.status).toBe(503);
      expect(await rowsFor(ref)).toBe(0);
      // The retry runs on a fresh connection and commits (quickly enough for the timeout).
      await retryRunsAndCommits(engine, k, ref);
      expect(await rowsFor(ref)).toBe(1);
      expect(await retryOf(engine, k, ref)).toEqual({ kind: 'replay', status: 201 });
    });
  });

  it('a handler whose transaction ran on a read-only connection (a failover behind one address) and failed: its key is freed, not held for the lease by a release sent on that same connection', async () => {
    // Connections opened while `readOnly` is set behave as ones to the demoted primary would.
    let readOnly = false;
    await withOwnPool({ max: 2 }, async (engine, _own, pool) => {
      opensReadOnlyWhile(pool, () => readOnly);
      const k = key();
      const ref = randomUUID();
      // The claim reaches a writable server; the transaction's connection, opened afterwards,
      // does not (mixed connections, as while the name moves). Arranged without timing: the
      // claim waits on an uncommitted row of its key, a waiter takes its connection when it is
      // given back, and the transaction gets a connection opened once the flag is set.
      const other = await pool.connect();
      const blocker = await db.pool.connect();
      await blocker.query('BEGIN');
      await blocker.query(`INSERT INTO ${db.table()} (key, state, expires_at) VALUES ($1, 'in_progress', now() - interval '1 second')`, [recordOf(k)]);
      const deciding = engine.decide(request(k, ref));
      await vi.waitFor(() => expect(pool.totalCount - pool.idleCount).toBe(2), { timeout: 5_000, interval: 5 });
      const waiter = pool.connect();
      await blocker.query('ROLLBACK');
      blocker.release();
      const taken = await waiter; // the claim's connection, given back
      readOnly = true;
      other.release(true); // its slot goes to the transaction: a new, read-only connection
      const decision = await deciding;
      if (decision.kind !== 'run') throw new Error(`expected run, got ${decision.kind}`);
      taken.release();
      const tx = pgTransaction(decision.lease.context);
      await expect(tx.query(`INSERT INTO ${orders} (ref) VALUES ($1)`, [ref])).rejects.toMatchObject({ code: '25006' });
      readOnly = false; // the name now leads to the writable primary only
      await decision.lease.abandon('handler-threw');
      // Before: the rollback gave the read-only connection back, the release that frees the key
      // took it at once and failed with 25006, and the key stayed claimed for the whole lease
      // (every retry a 409).
      expect(await store.get(recordOf(k))).toBeUndefined();
      await retryRunsAndCommits(engine, k, ref);
      expect(await rowsFor(ref)).toBe(1);
    });
  });

  it('works with a pool whose int4 and float8 values come back as text (a custom types parser)', async () => {
    const types = { getTypeParser: (oid: number, format?: 'text' | 'binary') => (oid === 23 || oid === 701 ? (v: string) => v : pg.types.getTypeParser(oid, format)) };
    await withOwnPool({ types }, async (engine) => {
      const { k, ref, decision } = await inserted(engine);
      expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(true);
      expect(await rowsFor(ref)).toBe(1);
      expect(await retryOf(engine, k, ref)).toEqual({ kind: 'replay', status: 201 });
      // A key still running: its Retry-After comes from the lease left, a number.
      const running = await inserted(engine);
      expect(await engine.decide(request(running.k, running.ref))).toMatchObject({ kind: 'problem', error: { status: 409, headers: { 'retry-after': '60' } } });
      await running.decision.lease.abandon('client-gone');
    });
  });

  it('the connection dies after the handler COMMITted: asked on another connection, the key is marked, not freed', async () => {
    await withOwnPool({}, async (engine) => {
      const { k, ref, decision, tx } = await inserted(engine);
      await tx.query('COMMIT');
      await killBackend(tx);
      expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(false);
      expect(await retryOf(engine, k, ref)).toMatchObject({ kind: 'replay', status: 410, reason: 'transaction-ended', originalStatus: 201 });
      expect(await rowsFor(ref)).toBe(1);
    });
  });

  it('the connection dies after the handler COMMITted and the pool is busy: the answer says "not confirmed", the key is marked once it is', async () => {
    await withOwnPool(
      { max: 3 },
      async (engine, _own, pool) => {
        const { k, ref, decision, tx } = await inserted(engine);
        await tx.query('COMMIT');
        // The pool is full, and the slot the dead client frees goes to a caller already waiting.
        const busy = [await pool.connect(), await pool.connect()];
        const waiting = pool.connect();
        await killBackend(tx);
        expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(false);
        expect(JSON.parse(new TextDecoder().decode(decision.lease.replacement?.body))).toMatchObject({ detail: expect.stringContaining('could not be confirmed') });
        for (const client of [...busy, await waiting]) client.release();
        expect(await completedLater(k)).toMatchObject({ state: 'completed', response: { status: 410 } });
        expect(await retryOf(engine, k, ref)).toMatchObject({ kind: 'replay', status: 410, reason: 'transaction-ended', originalStatus: 201 });
        expect(await rowsFor(ref)).toBe(1);
      },
      { storeTimeoutMs: 150 },
    );
  });

  it('a pool ended while the store asks about a dead connection: the question stops, it does not hold shutdown up', async () => {
    const pool = new pg.Pool({ connectionString: db.url, max: 1 });
    pool.on('error', () => undefined);
    const own = createPostgresStore({ pool, schema: db.schema });
    const k = key();
    const begun = await own.begin(recordOf(k), 'fp', 30_000);
    if (begun.kind !== 'acquired') throw new Error('expected acquired');
    const tx = await own.beginTransaction();
    await killBackend(tx.client);
    // The app shuts down: no connection will answer the question again.
    const ended = pool.end();
    const settled = tx.complete(recordOf(k), begun.token, { status: 201, headers: [], body: bytes('created') }, 60_000).then(
      () => 'resolved',
      (error: unknown) => (error instanceof Error ? error.message : String(error)),
    );
    // Within the test's timeout, not after a dozen backoff waits (~26 s).
    expect(await settled).toMatch(/not queryable|terminat|Connection/i);
    await ended;
  }, 8_000);

  it('a COMMIT slower than storeTimeoutMs (a deferred trigger): "not confirmed" at once, then stored, replayed, never run again', async () => {
    const slow = db.table(`slow_${randomUUID().slice(0, 8)}`);
    await db.pool.query(`CREATE TABLE ${slow} (id int)`);
    await db.pool.query(`CREATE OR REPLACE FUNCTION ${db.schema}.linger() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.4); RETURN NULL; END $$`);
    await db.pool.query(`CREATE CONSTRAINT TRIGGER linger AFTER INSERT ON ${slow} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ${db.schema}.linger()`);
    const events: IdempotencyEvent[] = [];
    await withOwnPool(
      {},
      async (engine) => {
        const { k, ref, decision, tx } = await inserted(engine);
        await tx.query(`INSERT INTO ${slow} (id) VALUES (1)`);
        expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(false);
        expect(decision.lease.replacement?.status).toBe(503);
        expect(await completedLater(k)).toMatchObject({ state: 'completed', response: { status: 201 } });
        expect(await retryOf(engine, k, ref)).toEqual({ kind: 'replay', status: 201 });
        expect(await rowsFor(ref)).toBe(1);
        await vi.waitFor(() => expect(events).toContainEqual(expect.objectContaining({ type: 'completed', stored: true })), { timeout: 10_000 });
        expect(events.some((e) => e.type === 'lease-lost' || e.type === 'released')).toBe(false);
      },
      { storeTimeoutMs: 150, onEvent: (e) => events.push(e) },
    );
  });

  it('a 4xx whose connection died is not let out as final: its write vanished, so the answer says retry', async () => {
    await withOwnPool({}, async (engine) => {
      const { ref, decision, tx } = await inserted(engine); // the declined attempt, recorded
      await killBackend(tx);
      expect(await decision.lease.commit({ status: 402, headers: [], body: bytes(`declined, attempt ${ref}`) })).toBe(false);
      expect(decision.lease.replacement?.status).toBe(503);
      expect(await rowsFor(ref)).toBe(0);
    });
  });

  it('backends terminated while transactions and migrate() check clients out: the process survives (it used to die within a second)', async () => {
    // A FATAL in the same socket read as the answer that freed a client (or answered our BEGIN)
    // is emitted before an `await pool.connect()` resumes; with no listener it ends the process.
    // In a child process (the built package), so a crash is an exit code, not this test runner's.
    // It runs until it has seen 30 kills, 30 transactions and 2 migrations, or 30 s passed (the old
    // code died at the first kill; this takes a few seconds even on a loaded 2-core machine). The
    // killer strikes again once more of the needed work got through, not every few ms: that left
    // a loaded machine no time to finish a transaction between strikes (600 kills, 11 transactions).
    const child = spawn(process.execPath, [fileURLToPath(new URL('./fixtures/kill-checkouts.mjs', import.meta.url)), db.url, db.schema, '30', '30000'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (err += chunk.toString()));
    const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
    expect({ code, err: err.slice(0, 500) }).toEqual({ code: 0, err: '' });
    const counts = JSON.parse(out) as { kills: number; inTransaction: number; transactions: number; migrations: number; failures: number };
    // The loop really raced the kills: backends died, some of them inside a checked-out client's
    // transaction, and work got through between them.
    expect(counts).toMatchObject({
      kills: expect.toSatisfy((n: number) => n >= 30),
      inTransaction: expect.toSatisfy((n: number) => n >= 1),
      transactions: expect.toSatisfy((n: number) => n >= 30),
      migrations: expect.toSatisfy((n: number) => n >= 2),
    });
  }, 60_000);

  it('the connection dies while the handler works: the process survives, nothing commits, the key is free', async () => {
    // pg-pool listens for a checked-out client's errors no more: an unhandled 'error' event
    // would end the process (and this test run with it).
    await withOwnPool({}, async (engine, own) => {
      const { k, ref, decision, tx } = await inserted(engine);
      await killBackend(tx);
      expect(await decision.lease.commit({ status: 201, headers: [], body: bytes('created') })).toBe(false);
      expect(decision.lease.replacement?.status).toBe(503);
      expect(await rowsFor(ref)).toBe(0);
      expect(await own.get(recordOf(k))).toBeUndefined();
    });
  });
});
