/**
 * A queue consumer as the reliability tests start it (`node dist/job-worker.js`): one job,
 * `charge`, wrapped in `idempotent()` from @idemkit/core, over a real store. The test plays the
 * queue: it delivers a job with `POST /deliver` (plain node:http, no idempotency middleware), as
 * a broker redelivers a message to any consumer, and gets back what the call returned or threw.
 *
 * The side effect is a row in `<PREFIX>_effects` (Postgres, created by the test). With
 * TRANSACTIONAL=1 (the Postgres store, EFFECTS_URL the same database) the job is
 * `idempotentTransaction()` and writes the row first, in its transaction (then prints `WROTE {…}`);
 * else it is `idempotent()` and writes the row at the end. A `RUN {…}` line on stdout marks each
 * start of the job's body.
 *
 * Env: STORE (postgres|redis|redis-cluster|mongodb), STORE_URL, PREFIX, EFFECTS_URL (Postgres),
 * LEASE_MS, STORE_TIMEOUT_MS, WAIT_TIMEOUT_MS, TRANSACTIONAL, PORT.
 */
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { idempotent, idempotentTransaction, type IdempotencyEvent } from '@idemkit/core';
import type { PostgresStore } from '@idemkit/postgres';
import pg from 'pg';
import { openStore } from './open-store.js';

const env = process.env;
const PREFIX = env.PREFIX ?? 'rel';
const EFFECTS = `"${PREFIX}_effects"`;
const TRANSACTIONAL = env.TRANSACTIONAL === '1';

export interface Order {
  readonly orderId: string;
  readonly cents: number;
}

/** How one delivery runs: not part of the job's identity (see `fingerprint` below). */
export interface Delivery {
  /** How long the job's body takes, in ms. */
  readonly workMs: number;
  /** Throw after the work instead of charging (a declined card). */
  readonly fail?: boolean;
}

/** What `charge` returns: the charge it made, and which worker made it. */
export interface Charge {
  readonly chargeId: string;
  readonly orderId: string;
  readonly cents: number;
  readonly pid: number;
}

/** One delivery's outcome, as `POST /deliver` answers it. */
export type Outcome = { readonly ok: true; readonly value: Charge } | { readonly ok: false; readonly name: string; readonly message: string };

const opened = await openStore(env.STORE ?? 'memory', env.STORE_URL ?? '', PREFIX);
const effects = new pg.Pool({ connectionString: env.EFFECTS_URL, max: 5 });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** One stdout line per fact the tests observe (synchronous on a pipe: it survives a SIGKILL). */
const line = (kind: string, data: unknown) => process.stdout.write(`${kind} ${JSON.stringify(data)}\n`);

const options = {
  store: opened.store,
  // Explicit, as the core README advises: a fingerprint holds the name, and fn.name would
  // change with a rename or a minifier.
  name: 'charge',
  key: (order: Order) => order.orderId,
  // The order is the job's identity; how long this delivery takes is not.
  fingerprint: (order: Order) => `${order.orderId}:${order.cents}`,
  leaseMs: Number(env.LEASE_MS ?? 60_000),
  storeTimeoutMs: Number(env.STORE_TIMEOUT_MS ?? 5_000),
  waitTimeoutMs: Number(env.WAIT_TIMEOUT_MS ?? 10_000),
  onEvent: (e: IdempotencyEvent) => {
    if (e.type === 'lease-lost' || e.type === 'lease-taken-over') line(e.type.toUpperCase(), e);
  },
  logger: { warn: () => undefined, error: (message: string) => line('ERROR', message) },
};

/** The charge row: written through `db` (the pool, or the job's transaction). */
async function insertCharge(db: pg.Pool | pg.PoolClient, order: Order): Promise<Charge> {
  const chargeId = `ch_${randomUUID()}`;
  await db.query(`INSERT INTO ${EFFECTS} (order_id, charge_id, pid) VALUES ($1, $2, $3)`, [order.orderId, chargeId, process.pid]);
  return { chargeId, orderId: order.orderId, cents: order.cents, pid: process.pid };
}

const charge = TRANSACTIONAL
  ? // The charge is written first, in the job's transaction: a worker that dies or stalls after it
    // leaves an uncommitted row, which only commits together with the stored result.
    idempotentTransaction(async (tx: pg.PoolClient, order: Order, delivery: Delivery): Promise<Charge> => {
      line('RUN', { orderId: order.orderId, pid: process.pid });
      const made = await insertCharge(tx, order);
      // Postgres has the row, uncommitted: a kill or stall after this line has something to lose.
      line('WROTE', { orderId: order.orderId, pid: process.pid });
      await sleep(delivery.workMs);
      if (delivery.fail) throw new Error('card declined');
      return made;
    }, { ...options, store: opened.store as PostgresStore })
  : // Written at the end, so a worker killed mid-job leaves none.
    idempotent(async (order: Order, delivery: Delivery): Promise<Charge> => {
      line('RUN', { orderId: order.orderId, pid: process.pid });
      await sleep(delivery.workMs);
      if (delivery.fail) throw new Error('card declined');
      return insertCharge(effects, order);
    }, options);

async function readJson(req: IncomingMessage): Promise<{ order: Order; delivery: Delivery }> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return JSON.parse(Buffer.concat(chunks).toString('utf8')) as { order: Order; delivery: Delivery };
}

const server = createServer((req, res) => {
  void (async () => {
    const { order, delivery } = await readJson(req);
    const outcome: Outcome = await charge(order, delivery).then(
      (value) => ({ ok: true as const, value }),
      (error: Error) => ({ ok: false as const, name: error.name, message: error.message }),
    );
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(outcome));
  })().catch((error: unknown) => res.writeHead(500).end(String(error)));
});
server.listen(Number(env.PORT ?? 0), '127.0.0.1', () => {
  console.log(`job worker (${env.STORE}) pid ${process.pid} on http://127.0.0.1:${(server.address() as AddressInfo).port}`);
});
process.once('SIGTERM', () => {
  server.close();
  void Promise.all([opened.close(), effects.end()]).then(() => process.exit(0), () => process.exit(1));
});
