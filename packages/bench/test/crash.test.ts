import { Redis } from 'ioredis';
import { afterAll, describe, expect, it } from 'vitest';
import { CRASH_LEASE_MS, crashCheck } from '../src/crash.js';
import { nodeIdempotencyStorageKey } from '../src/peers/node-idempotency.js';
import { startServer } from '../src/processes.js';
import { crashTable } from '../src/table.js';

// The crash check against real server processes (dist/server.js; `pnpm build` first) on the real
// Redis: a server is SIGKILLed mid-handler and the request retried on a fresh one. No timing
// assertions beyond the check's own bound: what the retries got, and how often the handler ran.
const url = process.env['TEST_REDIS_URL'];
if (!url) throw new Error('TEST_REDIS_URL is not set: run `bash scripts/services.sh up` and source its env file');

const redis = new Redis(url);
afterAll(async () => {
  await redis.quit();
});

describe('crash check (SIGKILL mid-handler, then retries on a fresh server)', () => {
  it('idemkit on Redis: 409 while the dead lease lasts, then the retry runs once and later ones replay it', async () => {
    const runId = `test_crash_${process.pid}_idemkit`;
    // A longer lease than the bench's 2 s: a loaded machine may take seconds to start the fresh
    // server, and the first retry must still find the dead lease running.
    const leaseMs = 8_000;
    const spec = { framework: 'fastify', library: 'idemkit', store: 'redis', runId, env: { redis: url }, handler: 'hello', ordersTable: '', leaseMs } as const;
    const result = await crashCheck(() => startServer(spec), leaseMs);
    expect(result).toMatchObject({ firstRetryStatus: 409, recoveredStatus: 201, runsAfterCrash: 1, replaysIdentical: true, stillHeldMs: null });
    expect(result.blockedMs).toBeGreaterThanOrEqual(result.restartMs);
    expect(crashTable([{ framework: 'fastify', library: 'idemkit', store: 'redis', ...result }])).toMatch(/\| 409 +\| \d+\.\d s \(lease 8\.0 s\) +\| 201, handler ran once \| replayed, identical \|/);
    // The fresh server's SIGTERM removed the run's keys, the dead claim's included.
    expect(await redis.keys(`idemkit-bench:${runId}:*`)).toEqual([]);
  });

  it('@node-idempotency/core on Redis: every retry gets 409, and the dead claim stays for its response TTL', async () => {
    const runId = `test_crash_${process.pid}_peer`;
    const spec = { framework: 'express', library: 'node-idempotency', store: 'redis', runId, env: { redis: url }, handler: 'hello', ordersTable: '' } as const;
    let heldKey = '';
    const result = await crashCheck(
      () => startServer(spec),
      null,
      async (key) => {
        heldKey = nodeIdempotencyStorageKey(runId, 'POST', '/crash', key);
        return redis.pttl(heldKey);
      },
    );
    expect(result).toMatchObject({ firstRetryStatus: 409, recoveredStatus: null, blockedMs: null, runsAfterCrash: 0, replaysIdentical: null });
    expect(result.retriedMs).toBeGreaterThanOrEqual(CRASH_LEASE_MS + 4_000);
    // The bench gives it a 10-minute TTL (BENCH_TTL_MS); the claim holds that long, not a lease.
    expect(result.stillHeldMs).toBeGreaterThan(60_000);
    expect(await redis.exists(heldKey)).toBe(0); // the fresh server's close removed it
    expect(crashTable([{ framework: 'express', library: 'node-idempotency', store: 'redis', ...result }])).toMatch(/\| 409 +\| still at \d+\.\d s \(gave up\) \| – +\| – +\| \d+\.\d s +\|/);
  });

  it('a restart slower than the lease is reported as such, not as 409s that never came', () => {
    const row = { framework: 'fastify', library: 'idemkit', store: 'redis', leaseMs: 2_000, firstRetryStatus: 201, restartMs: 3_900, blockedMs: 0, recoveredStatus: 201, runsAfterCrash: 1, replaysIdentical: true, retriedMs: 3_900, stillHeldMs: null } as const;
    expect(crashTable([row])).toMatch(/\| 3\.9 s +\| 201 +\| none: the restart outlasted the lease \(lease 2\.0 s\) \|/);
  });
});
