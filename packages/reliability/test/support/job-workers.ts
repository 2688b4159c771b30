import { uniqueSuffix } from '@idemkit/test-services';
import type pg from 'pg';
import { afterAll, beforeAll } from 'vitest';
import type { Order, Outcome } from '../../src/job-worker.js';
import { dropNamespace } from '../../src/records.js';
import { serviceUrl } from '../../src/services.js';
import { JOB_WORKER, ProcessPool, type ServerProcess } from '../../src/spawn.js';
import { createEffects, dropEffects } from './effects.js';

export interface JobWorkers {
  /** The namespace of this describe's keys and charge rows. */
  readonly ns: string;
  /** The charge rows' pool (the side effect), once the describe has started. */
  effects(): pg.Pool;
  /** `count` job worker processes on the store, with these settings (`LEASE_MS`, `WAIT_TIMEOUT_MS`, …). */
  spawn(count: number, settings: Record<string, string>): Promise<ServerProcess[]>;
}

/**
 * Job worker processes on one `kind` store, in a namespace of their own, with a Postgres table of
 * the charges they make: the describe's hooks set them up and remove all of it afterwards.
 */
export function jobWorkersOn(kind: 'postgres' | 'redis', prefix: string): JobWorkers {
  const pool = new ProcessPool();
  const ns = `${prefix}_${uniqueSuffix()}`;
  let url = '';
  let effects: pg.Pool | undefined;
  beforeAll(async () => {
    url = await serviceUrl(kind);
    effects = await createEffects(ns);
  });
  afterAll(async () => {
    await pool.stopAll();
    await dropNamespace(kind, url, [`${ns}_keys`], `${ns}:`);
    if (effects) await dropEffects(effects, ns);
  });
  return {
    ns,
    effects: () => {
      if (!effects) throw new Error('the describe has not started');
      return effects;
    },
    spawn: async (count, settings) => {
      const env = { STORE: kind, STORE_URL: url, PREFIX: ns, EFFECTS_URL: await serviceUrl('postgres'), ...settings };
      return Promise.all(Array.from({ length: count }, () => pool.spawn(JOB_WORKER, env)));
    },
  };
}

/** One delivery of `order` to `worker`, whose job works `workMs` before it charges; the worker's outcome. */
export async function deliverTo(worker: ServerProcess, order: Order, workMs: number): Promise<Outcome> {
  const res = await fetch(`${worker.url}/deliver`, { method: 'POST', body: JSON.stringify({ order, delivery: { workMs } }) });
  return (await res.json()) as Outcome;
}
