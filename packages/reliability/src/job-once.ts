/**
 * A one-shot job, as cron or a CLI runs one (`node dist/job-once.js`): one `charge` call wrapped in
 * `idempotent()` over a real store, then the store is closed and the script ends by itself, with
 * no `process.exit()`. What the call left undone when it resolved is lost then: the test checks
 * that a result is stored before the call resolves, even when the store failed its completion.
 *
 * The job's body prints `RUN`, then waits for a line on stdin before it returns, so the test can
 * break the store while the job runs without guessing at timings. Other stdout lines:
 * `STORE-ERROR {operation}`, `COMPLETED {stored}`, `LEASE-LOST {operation}`, `RESOLVED {value}`,
 * `REJECTED {name, message}`, `SIGTERM {}`.
 *
 * On SIGTERM it shuts down as a worker does (a Kubernetes pod being stopped): it closes the store
 * at once, with the call still running, and ends by itself once nothing is left to wait for.
 *
 * Env: STORE, STORE_URL, PREFIX, ORDER_ID, LEASE_MS, STORE_TIMEOUT_MS.
 */
import { once } from 'node:events';
import { idempotent, type IdempotencyEvent } from '@idemkit/core';
import { openStore } from './open-store.js';

const env = process.env;
const line = (kind: string, data: unknown) => process.stdout.write(`${kind} ${JSON.stringify(data)}\n`);

const opened = await openStore(env.STORE ?? 'memory', env.STORE_URL ?? '', env.PREFIX ?? 'once');
let closing: Promise<void> | undefined;
/** Once: the SIGTERM handler and the end of the script may both get here. */
const close = (): Promise<void> => (closing ??= opened.close());
process.once('SIGTERM', () => {
  line('SIGTERM', {});
  void close();
});

const charge = idempotent(
  async (orderId: string) => {
    line('RUN', { orderId });
    await once(process.stdin, 'data');
    // Read once: a stdin left open would keep the process alive by itself.
    process.stdin.destroy();
    return { chargeId: `ch_${orderId}_${process.pid}` };
  },
  {
    store: opened.store,
    name: 'charge',
    key: (orderId) => orderId,
    leaseMs: Number(env.LEASE_MS ?? 60_000),
    storeTimeoutMs: Number(env.STORE_TIMEOUT_MS ?? 5_000),
    onEvent: (e: IdempotencyEvent) => {
      if (e.type === 'store-error') line('STORE-ERROR', { operation: e.operation });
      if (e.type === 'completed') line('COMPLETED', { stored: e.stored });
      if (e.type === 'lease-lost') line('LEASE-LOST', { operation: e.operation });
    },
    logger: false,
  },
);

try {
  line('RESOLVED', await charge(env.ORDER_ID ?? 'order-1'));
} catch (error) {
  line('REJECTED', { name: (error as Error).name, message: (error as Error).message });
}
await close();
