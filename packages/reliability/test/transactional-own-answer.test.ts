/**
 * Transactional mode on Postgres, through the bindings over real sockets: a handler that awaits
 * its transaction and then answers a status that is not stored (500, 429, …) has its writes rolled
 * back and its key freed *before* its answer goes out (SPEC §2), so a client retrying at once runs
 * the operation again instead of meeting a 409 that says to wait a whole lease. Express and Koa.
 * Fastify is run here too, but frees such a key only as the answer finishes: it cannot tell the
 * handler's own answer after an await from a timeout's until the handler settles (its README).
 */
import { randomUUID } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import type { IdempotencyEvent } from '@idemkit/core';
import { pgTransaction } from '@idemkit/postgres';
import { describe, expect, it, vi } from 'vitest';
import { serveOrders, type Framework, type OrderWork } from './support/orders-apps.js';
import { ordersSchema } from './support/orders-schema.js';

const db = ordersSchema('own_answer_hp');

interface Harness {
  url: string;
  /** Per key: whether its response had begun to go out when its key was freed. */
  readonly sentWhenFreed: Map<string, boolean>;
  close(): Promise<void>;
}

/** The handler: insert in the transaction, then answer `status` the first time, 201 after. */
async function start(framework: Framework, status: number): Promise<Harness> {
  const responses = new Map<string, ServerResponse>();
  const sentWhenFreed = new Map<string, boolean>();
  const runs = new Map<string, number>();
  const options = {
    store: db.store,
    transactional: true,
    logger: false as const,
    onEvent: (event: IdempotencyEvent) => {
      if (event.type === 'released') sentWhenFreed.set(event.key, responses.get(event.key)?.headersSent ?? false);
    },
  };
  const work: OrderWork = async (context, res) => {
    const key = context?.key ?? '';
    responses.set(key, res);
    const n = (runs.get(key) ?? 0) + 1;
    runs.set(key, n);
    await pgTransaction(context).query(`INSERT INTO ${db.rows} (ref) VALUES ($1)`, [key]);
    return n === 1 ? status : 201;
  };
  const app = await serveOrders(framework, options, work);
  return { url: app.url, sentWhenFreed, close: app.close };
}

const count = (key: string): Promise<number> => db.count(key);

describe.each(['express', 'koa', 'fastify'] as const)('%s, transactional, on Postgres', (framework) => {
  it.each([500, 429, 409, 503])('a handler that awaited its transaction and answers %i: rolled back and freed before the answer goes out', async (status) => {
    const app = await start(framework, status);
    try {
      for (let round = 0; round < 3; round++) {
        const key = randomUUID();
        const post = () =>
          fetch(`${app.url}/orders`, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': key }, body: '{}' });
        const first = await post();
        expect(first.status).toBe(status);
        await first.text();
        // Freed before its head went out; on Fastify, as it finished (waited for here: a retry
        // sent in that instant gets 409).
        await vi.waitFor(() => expect(app.sentWhenFreed.has(key)).toBe(true), { timeout: 5_000, interval: 5 });
        expect(app.sentWhenFreed.get(key)).toBe(framework === 'fastify');
        expect(await count(key)).toBe(0);
        const retry = await post();
        expect(retry.status).toBe(201);
        await retry.text();
        expect(await count(key)).toBe(1);
      }
    } finally {
      await app.close();
    }
  });
});
