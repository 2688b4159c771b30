import type { IdempotencyStore } from '@idemkit/core';
import type { PoolClient } from 'pg';
import { expect } from 'vitest';
import { expectProblem, newKey, type CaseContext } from './context.js';
import { uniqueSuffix } from '@idemkit/test-services';

/** SPEC §2 row: store unreachable or failing. */
export function failureCases(t: CaseContext): void {
  let broken: IdempotencyStore | undefined;
  const brokenStore = async (): Promise<IdempotencyStore> => (broken ??= await t.harness().broken());

  t.test('store failing → 503 problem, handler not run (fail closed)', async () => {
    const app = await t.app({ storeTimeoutMs: 2_000 }, { store: await brokenStore() });
    const reply = await app.post('/orders', { key: newKey() });
    expectProblem(reply, 503, 'ERR_IDEMKIT_STORE_UNAVAILABLE');
    expect(app.count('orders')).toBe(0);
  });

  t.test("store failing with onStoreError: 'pass' → handler runs, never claims a replay", async () => {
    const app = await t.app({ storeTimeoutMs: 2_000, onStoreError: 'pass' }, { store: await brokenStore() });
    const key = newKey();
    const first = await app.post('/orders', { key });
    const second = await app.post('/orders', { key });
    for (const reply of [first, second]) {
      expect(reply.status).toBe(201);
      expect(reply.headers.get('idempotent-replayed')).toBeNull();
    }
    expect(app.count('orders')).toBe(2);
  });
}

/** Postgres transactional mode: business writes and the stored response commit or roll back together. */
export function transactionalCases(t: CaseContext): void {
  t.test('transactional: a throw leaves no row and the retry inserts exactly one; success replays', async () => {
    const { pg } = t.harness();
    if (!pg) throw new Error('transactional cases need the postgres harness');
    const table = `${pg.schema}.tx_rows_${uniqueSuffix()}`;
    await pg.pool.query(`CREATE TABLE ${table} (ref text NOT NULL)`);
    const rows = async (ref: string): Promise<number> =>
      Number((await pg.pool.query<{ n: string }>(`SELECT count(*) AS n FROM ${table} WHERE ref = $1`, [ref])).rows[0]?.n);

    let failNext = true;
    const app = await t.app(
      { transactional: true },
      {
        txWork: async (transaction, body) => {
          const ref = (body as { ref: string }).ref;
          await (transaction as PoolClient).query(`INSERT INTO ${table} (ref) VALUES ($1)`, [ref]);
          if (failNext) {
            failNext = false;
            throw new Error('business rule failed after the insert');
          }
          return { inserted: ref };
        },
      },
    );
    const key = newKey();
    const body = { ref: key };
    const failed = await app.post('/tx', { key, json: body });
    expect(failed.status).toBe(500);
    expect(await rows(key)).toBe(0);

    const retry = await app.post('/tx', { key, json: body });
    expect(retry.status).toBe(201);
    expect(retry.json()).toEqual({ inserted: key });
    expect(await rows(key)).toBe(1);

    const replay = await app.post('/tx', { key, json: body });
    expect(replay.replayed).toBe(true);
    expect(replay.body).toEqual(retry.body);
    expect(await rows(key)).toBe(1);
    expect(app.count('tx')).toBe(2);
  });

  t.test('transactional: a COMMIT that fails answers 503 with the CORS header of middleware before idempotency; nothing committed, the retry runs', async () => {
    const { pg } = t.harness();
    if (!pg) throw new Error('transactional cases need the postgres harness');
    const table = `${pg.schema}.tx_deferred_${uniqueSuffix()}`;
    // Checked at COMMIT: the handler's inserts succeed, its transaction's COMMIT fails.
    await pg.pool.query(`CREATE TABLE ${table} (ref text NOT NULL, CONSTRAINT one_ref UNIQUE (ref) DEFERRABLE INITIALLY DEFERRED)`);
    let twice = true;
    const app = await t.app(
      { transactional: true, logger: false },
      {
        txWork: async (transaction, body) => {
          const ref = (body as { ref: string }).ref;
          const client = transaction as PoolClient;
          await client.query(`INSERT INTO ${table} (ref) VALUES ($1)`, [ref]);
          if (twice) await client.query(`INSERT INTO ${table} (ref) VALUES ($1)`, [ref]);
          twice = false;
          return { inserted: ref };
        },
      },
    );
    const key = newKey();
    const failed = await app.post('/tx', { key, json: { ref: key } });
    expect(failed.status).toBe(503);
    expect(failed.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    // Before: every header was removed with the handler's, so a browser could not read this 503.
    expect(failed.headers.get('access-control-allow-origin')).toBe('https://shop.example');
    const rows = async (): Promise<number> => Number((await pg.pool.query<{ n: string }>(`SELECT count(*) AS n FROM ${table} WHERE ref = $1`, [key])).rows[0]?.n);
    expect(await rows()).toBe(0);
    const retry = await app.post('/tx', { key, json: { ref: key } });
    expect(retry.status).toBe(201);
    expect(retry.json()).toEqual({ inserted: key });
    expect(await rows()).toBe(1);
    expect(app.count('tx')).toBe(2);
  });

  t.test('transactional: a handler whose helper COMMITs on the client answers once; retries get 410 and never run it again', async () => {
    const { pg } = t.harness();
    if (!pg) throw new Error('transactional cases need the postgres harness');
    const table = `${pg.schema}.tx_rows_${uniqueSuffix()}`;
    await pg.pool.query(`CREATE TABLE ${table} (ref text NOT NULL)`);
    const app = await t.app(
      { transactional: true, logger: false },
      {
        txWork: async (transaction, body) => {
          const ref = (body as { ref: string }).ref;
          const client = transaction as PoolClient;
          // A data-access helper with its own transaction: its COMMIT commits idemkit's too.
          await client.query('BEGIN');
          await client.query(`INSERT INTO ${table} (ref) VALUES ($1)`, [ref]);
          await client.query('COMMIT');
          return { inserted: ref };
        },
      },
    );
    const key = newKey();
    const first = await app.post('/tx', { key, json: { ref: key } });
    expect(first.status).toBe(201);
    expect(first.json()).toEqual({ inserted: key });
    for (let i = 0; i < 2; i++) {
      const retry = await app.post('/tx', { key, json: { ref: key } });
      expectProblem(retry, 410, 'ERR_IDEMKIT_RESPONSE_NOT_REPLAYABLE');
      expect(retry.json()).toMatchObject({ reason: 'transaction-ended', originalStatus: 201 });
    }
    expect(Number((await pg.pool.query<{ n: string }>(`SELECT count(*) AS n FROM ${table} WHERE ref = $1`, [key])).rows[0]?.n)).toBe(1);
    expect(app.count('tx')).toBe(1);
  });
}
