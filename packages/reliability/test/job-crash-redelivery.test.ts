/**
 * A worker killed (SIGKILL) mid-job, and its message then redelivered to every surviving worker
 * at once: after the dead worker's lease, exactly one of them runs the job, and every delivery
 * gets that one charge. And a worker frozen past its lease: its late completion never
 * overwrites the result of the worker that took its key over.
 */
import { describe, expect, it, vi } from 'vitest';
import type { Outcome } from '../src/job-worker.js';
import type { ServerProcess } from '../src/spawn.js';
import { deliverTo, jobWorkersOn } from './support/job-workers.js';

describe.each(['postgres', 'redis'] as const)('a job worker killed mid-job on %s, its message redelivered to three workers at once', (kind) => {
  const workers = jobWorkersOn(kind, 'job_crash');
  const { ns } = workers;

  it('one of them runs it once, after the lease; all get that charge', async () => {
    const [doomed, ...survivors] = await workers.spawn(4, { LEASE_MS: '1000', WAIT_TIMEOUT_MS: '10000' });
    const order = { orderId: `${ns}-o1`, cents: 100 };
    const deliver = (worker: ServerProcess, workMs: number): Promise<Outcome> => deliverTo(worker, order, workMs);
    const lost = deliver(doomed!, 60_000).catch((error: unknown) => error);
    await vi.waitFor(() => expect(doomed!.events('RUN')).toHaveLength(1), { timeout: 10_000, interval: 10 });
    doomed!.child.kill('SIGKILL');
    expect(await lost).toBeInstanceOf(Error);

    const outcomes = await Promise.all(survivors.flatMap((w) => [deliver(w, 50), deliver(w, 50)]));
    const values = outcomes.map((o) => (o.ok ? o.value : o));
    const { rows } = await workers.effects().query<{ charge_id: string; pid: number }>(`SELECT charge_id, pid FROM "${ns}_effects"`);
    expect(rows).toHaveLength(1);
    for (const v of values) expect(v).toMatchObject({ chargeId: rows[0]!.charge_id, pid: rows[0]!.pid });
    expect(survivors.flatMap((w) => w.events('RUN'))).toHaveLength(1);
    expect(survivors.flatMap((w) => w.events('LEASE-TAKEN-OVER'))).toHaveLength(1);
    expect(survivors.flatMap((w) => w.events('LEASE-LOST'))).toEqual([]);
  });

  it('a worker frozen (SIGSTOP) past its lease and thawed after the takeover finished: its late result is refused, never stored over the taker\'s', async () => {
    const [frozen, taker] = await workers.spawn(2, { LEASE_MS: '1000', WAIT_TIMEOUT_MS: '10000' });
    const order = { orderId: `${ns}-o2`, cents: 200 };
    const deliver = (worker: ServerProcess, workMs: number): Promise<Outcome> => deliverTo(worker, order, workMs);
    const late = deliver(frozen!, 300);
    await vi.waitFor(() => expect(frozen!.events('RUN')).toHaveLength(1), { timeout: 10_000, interval: 10 });
    frozen!.child.kill('SIGSTOP');
    const taken = await deliver(taker!, 10);
    if (!taken.ok) throw new Error(taken.message);
    frozen!.child.kill('SIGCONT');
    // Outside a transaction its own charge was made (GUARANTEES, "Does not hold"), and its call
    // returns it; what matters here is that the store keeps the taker's.
    await late;
    await vi.waitFor(() => expect(frozen!.events('LEASE-LOST')).not.toEqual([]), { timeout: 10_000, interval: 10 });
    for (let i = 0; i < 3; i++) expect(await deliver(i % 2 ? taker! : frozen!, 10)).toEqual(taken);
    expect(taker!.events('RUN')).toHaveLength(1);
    expect(frozen!.events('RUN')).toHaveLength(1);
  });
});
