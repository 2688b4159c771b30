/**
 * Background jobs: `idempotent()` from @idemkit/core in three queue-consumer processes on one
 * real store, the test playing a broker that redelivers every message to several consumers at
 * once. The side effect (a charge row in Postgres) must happen once per order whoever runs it,
 * and every delivery must return that one charge.
 */
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import pg from 'pg';
import type { Charge, Delivery, Order, Outcome } from '../src/job-worker.js';
import { countRecords, dropNamespace, location, type StoreKind } from '../src/records.js';
import { namespace, serviceUrl } from '../src/services.js';
import { createEffects, dropEffects } from './support/effects.js';
import { JOB_WORKER, ProcessPool, type ServerProcess } from '../src/spawn.js';

/**
 * The shared workers' lease. It must stay well above the store's slowest answer under load (core
 * README, `leaseMs`): FerretDB takes about 2.5 s (3.3 s on a loaded machine) for the 240-delivery
 * burst below, and with a 1 s lease a holder's completion queued behind it arrived after its
 * lease, another worker took the order over, and it was charged twice (seen). Their store
 * deadline is 8 s, below the lease and above that burst. The tests of renewal, crash and stall
 * run a worker of their own on a short lease.
 */
const LEASE_MS = 10_000;
const SHORT_LEASE_MS = 1_000;
/** A worker on the short lease, with the default store deadline (5 s; the shared workers wait 8 s, below their lease). */
const SHORT_LEASE = { LEASE_MS: String(SHORT_LEASE_MS), STORE_TIMEOUT_MS: '5000' };
const ORDERS = 40;
/** Each store with `idempotent()`, and Postgres once more with `idempotentTransaction()`. */
const setups = [
  { name: 'idempotent() on one redis', kind: 'redis', transactional: false },
  { name: 'idempotent() on one redis-cluster', kind: 'redis-cluster', transactional: false },
  { name: 'idempotent() on one postgres', kind: 'postgres', transactional: false },
  { name: 'idempotent() on one mongodb', kind: 'mongodb', transactional: false },
  { name: 'idempotentTransaction() on one postgres, the charge written first in its transaction', kind: 'postgres', transactional: true },
] as const satisfies ReadonlyArray<{ name: string; kind: StoreKind; transactional: boolean }>;

async function deliver(worker: ServerProcess, order: Order, delivery: Delivery): Promise<Outcome> {
  const res = await fetch(`${worker.url}/deliver`, { method: 'POST', body: JSON.stringify({ order, delivery }) });
  expect(res.status).toBe(200);
  return (await res.json()) as Outcome;
}

function value(outcome: Outcome): Charge {
  if (!outcome.ok) throw new Error(`the job failed: ${outcome.name}: ${outcome.message}`);
  return outcome.value;
}

const runsOf = (workers: ServerProcess[], orderId: string) =>
  workers.flatMap((w) => w.events('RUN').filter((e) => e.orderId === orderId).map((e) => e.pid));

/** Until `worker` is inside the job; in a transaction, until its charge row is written, uncommitted. */
const midJob = (worker: ServerProcess, orderId: string, transactional: boolean) =>
  vi.waitFor(() => expect(worker.events(transactional ? 'WROTE' : 'RUN').filter((e) => e.orderId === orderId)).toHaveLength(1), { timeout: 10_000, interval: 10 });

/** The lease events (`LEASE-TAKEN-OVER`, `LEASE-LOST`) the workers reported for one order. */
const leaseEventsOf = (workers: ServerProcess[], orderId: string) =>
  workers.flatMap((w) => ['LEASE-TAKEN-OVER', 'LEASE-LOST'].flatMap((kind) => w.events(kind).filter((e) => e.key === orderId).map(() => `${kind} ${w.pid}`)));

describe.each(setups)('jobs in three worker processes: $name', ({ kind, transactional }) => {
  const pool = new ProcessPool();
  const ns = namespace(`jobs_${kind.replace('-', '_')}${transactional ? '_tx' : ''}`);
  let url = '';
  let effects: pg.Pool;
  let workers: ServerProcess[] = [];
  let env: Record<string, string> = {};

  /** The charge rows (side effects) of one order, oldest first. */
  async function chargesOf(orderId: string): Promise<Array<{ charge_id: string; pid: number }>> {
    const { rows } = await effects.query<{ charge_id: string; pid: number }>(
      `SELECT charge_id, pid FROM "${ns}_effects" WHERE order_id = $1 ORDER BY id`,
      [orderId],
    );
    return rows;
  }

  beforeAll(async () => {
    url = await serviceUrl(kind);
    const effectsUrl = await serviceUrl('postgres');
    effects = await createEffects(ns, 3);
    env = { STORE: kind, STORE_URL: url, PREFIX: ns, EFFECTS_URL: effectsUrl, LEASE_MS: String(LEASE_MS), STORE_TIMEOUT_MS: '8000', WAIT_TIMEOUT_MS: '20000', TRANSACTIONAL: transactional ? '1' : '0' };
    workers = await Promise.all([0, 1, 2].map(() => pool.spawn(JOB_WORKER, env)));
  });

  afterAll(async () => {
    await pool.stopAll();
    await dropNamespace(kind, url, [`${ns}_keys`], `${ns}:`);
    await dropEffects(effects, ns);
  });

  it(`${ORDERS} orders, each delivered twice to all three workers at once: one charge per order, returned to all six deliveries`, async () => {
    const orders = Array.from({ length: ORDERS }, (_, i): Order => ({ orderId: `${ns}-storm-${i}`, cents: 100 + i }));
    const outcomes = await Promise.all(
      orders.map((order) => Promise.all([...workers, ...workers].map((w) => deliver(w, order, { workMs: 20 })))),
    );

    for (const [i, order] of orders.entries()) {
      const values = outcomes[i]!.map(value);
      const charges = await chargesOf(order.orderId);
      expect(charges, order.orderId).toHaveLength(1);
      for (const v of values) expect(v).toEqual({ chargeId: charges[0]!.charge_id, orderId: order.orderId, cents: order.cents, pid: charges[0]!.pid });
      expect(runsOf(workers, order.orderId)).toEqual([charges[0]!.pid]);
    }
    // Which worker ran which order is a race the store settles (one worker may win all 40: seen);
    // the other tests make each of the three run a job.
    expect(await countRecords(kind, url, location(kind, ns, 'app'))).toMatchObject({ total: ORDERS, completed: ORDERS, inProgress: 0 });
  });

  it('a job running three times its lease keeps it (renewed), and the deliveries waiting on it get its charge', async () => {
    const holder = await pool.spawn(JOB_WORKER, { ...env, ...SHORT_LEASE });
    const order: Order = { orderId: `${ns}-long`, cents: 500 };
    const first = deliver(holder, order, { workMs: 3 * SHORT_LEASE_MS });
    await vi.waitFor(() => expect(runsOf([holder], order.orderId)).toHaveLength(1), { timeout: 10_000, interval: 10 });
    const waiting = [deliver(workers[1]!, order, { workMs: 10 }), deliver(workers[2]!, order, { workMs: 10 })];

    const values = (await Promise.all([first, ...waiting])).map(value);
    expect(values[0]!.pid).toBe(holder.pid);
    for (const v of values) expect(v).toEqual(values[0]);
    expect(await chargesOf(order.orderId)).toEqual([{ charge_id: values[0]!.chargeId, pid: holder.pid }]);
    expect(runsOf([holder, ...workers], order.orderId)).toEqual([holder.pid]);
    expect(leaseEventsOf([holder, ...workers], order.orderId)).toEqual([]);
    await holder.stop();
  });

  it('a job that throws frees its key: the delivery waiting on it runs the job itself, and later ones get that charge', async () => {
    const order: Order = { orderId: `${ns}-declined`, cents: 700 };
    const failing = deliver(workers[0]!, order, { workMs: 300, fail: true });
    await vi.waitFor(() => expect(runsOf(workers, order.orderId)).toHaveLength(1), { timeout: 10_000, interval: 10 });
    const waiter = deliver(workers[1]!, order, { workMs: 10 });

    expect(await failing).toEqual({ ok: false, name: 'Error', message: 'card declined' });
    const charged = value(await waiter);
    expect(charged.pid).toBe(workers[1]!.pid);
    expect(value(await deliver(workers[2]!, order, { workMs: 10 }))).toEqual(charged);
    expect(await chargesOf(order.orderId)).toEqual([{ charge_id: charged.chargeId, pid: workers[1]!.pid }]);
    expect(runsOf(workers, order.orderId)).toEqual([workers[0]!.pid, workers[1]!.pid]);
    // Given back, not waited out: the second run claimed a free key instead of taking one over.
    expect(leaseEventsOf(workers, order.orderId)).toEqual([]);
  });

  it('the same order id with another amount is refused on every worker, and the first charge stands', async () => {
    const order: Order = { orderId: `${ns}-amount`, cents: 100 };
    const charged = value(await deliver(workers[0]!, order, { workMs: 10 }));
    const other = await Promise.all(workers.map((w) => deliver(w, { ...order, cents: 999 }, { workMs: 10 })));
    for (const o of other) expect(o).toMatchObject({ ok: false, name: 'FingerprintMismatchError' });
    expect(value(await deliver(workers[2]!, order, { workMs: 10 }))).toEqual(charged);
    expect(await chargesOf(order.orderId)).toHaveLength(1);
  });

  // The survivors' own lease does not matter here: the store keeps the one the doomed worker took.
  it('a worker killed mid-job: another worker waits out its lease, runs the job once, and later deliveries get that charge', async () => {
    const doomed = await pool.spawn(JOB_WORKER, { ...env, ...SHORT_LEASE });
    const order: Order = { orderId: `${ns}-crash`, cents: 900 };
    const lost = deliver(doomed, order, { workMs: 60_000 }).catch((error: unknown) => error);
    await midJob(doomed, order.orderId, transactional);
    // Mid-job: a deploy, the OOM killer. Before its charge; in a transaction, after its uncommitted one.
    doomed.child.kill('SIGKILL');
    expect(await lost).toBeInstanceOf(Error);

    const taken = value(await deliver(workers[1]!, order, { workMs: 10 }));
    expect(taken.pid).toBe(workers[1]!.pid);
    const later = await Promise.all(workers.map((w) => deliver(w, order, { workMs: 10 })));
    for (const o of later) expect(value(o)).toEqual(taken);
    expect(await chargesOf(order.orderId)).toEqual([{ charge_id: taken.chargeId, pid: workers[1]!.pid }]);
    expect(runsOf([doomed, ...workers], order.orderId)).toEqual([doomed.pid, workers[1]!.pid]);
    expect(leaseEventsOf(workers, order.orderId)).toEqual([`LEASE-TAKEN-OVER ${workers[1]!.pid}`]);
  });
  // Only in a transaction: outside one the stalled worker's charge stays (GUARANTEES, "Does not hold").
  if (transactional) it('a worker stalled past its lease after its charge: the charge rolls back, and its call returns the charge of the worker that took over', async () => {
    const stalled = await pool.spawn(JOB_WORKER, { ...env, ...SHORT_LEASE });
    const order: Order = { orderId: `${ns}-stall`, cents: 300 };
    const late = deliver(stalled, order, { workMs: 2 * SHORT_LEASE_MS });
    await midJob(stalled, order.orderId, transactional);
    stalled.child.kill('SIGSTOP'); // a GC pause, a frozen VM: no renewals, its transaction open

    const taken = value(await deliver(workers[1]!, order, { workMs: 10 }));
    expect(taken.pid).toBe(workers[1]!.pid);
    stalled.child.kill('SIGCONT');
    expect(value(await late)).toEqual(taken);
    expect(await chargesOf(order.orderId)).toEqual([{ charge_id: taken.chargeId, pid: workers[1]!.pid }]);
    expect(runsOf([stalled, ...workers], order.orderId)).toEqual([stalled.pid, workers[1]!.pid]);
    // Its renewal and its completion are refused (one or both, by timing), nothing else.
    expect(new Set(leaseEventsOf([stalled], order.orderId))).toEqual(new Set([`LEASE-LOST ${stalled.pid}`]));
    await stalled.stop();
  });
});
