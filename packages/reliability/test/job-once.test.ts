/**
 * A one-shot job (cron, a CLI) ends right after its call resolves, with nothing left to keep the
 * process alive. If the store failed the job's completion, that completion is retried in the
 * background; resolving before it landed would let the process exit with the result unstored,
 * and the next delivery of the key would run the job a second time once the lease ran out.
 */
import { spawn } from 'node:child_process';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { namespace } from '../src/services.js';
import { JOB_ONCE } from '../src/spawn.js';
import { ThrowawayRedis } from './support/redis-server.js';

interface Run {
  /** Stdout lines so far, `KIND {json}`. */
  lines(): string[];
  /** Answers the job's wait for stdin (it returns then). */
  go(): void;
  /** Sends SIGTERM, as Kubernetes does to a pod it stops. */
  terminate(): void;
  /** Resolves with the exit code, once the process ended by itself. */
  readonly exited: Promise<number | null>;
}

function runOnce(env: Record<string, string>): Run {
  const child = spawn(process.execPath, [JOB_ONCE], { env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (c: Buffer) => (out += c.toString()));
  child.stderr.on('data', (c: Buffer) => (out += c.toString()));
  // A process that ended before reading stdin makes the write fail: that is for the test to see.
  child.stdin.on('error', () => undefined);
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  // Never left behind: a run that hangs is killed when its test times out.
  afterAll(() => void child.kill('SIGKILL'));
  return { lines: () => out.split('\n').filter(Boolean), go: () => child.stdin.write('go\n'), terminate: () => void child.kill('SIGTERM'), exited };
}

const waitForLine = (run: Run, line: string) =>
  vi.waitFor(() => expect(run.lines()).toContain(line), { timeout: 15_000, interval: 10 });

describe('a one-shot job on Redis whose completion Redis refused', () => {
  let redis: ThrowawayRedis;
  let admin: Redis;
  const ns = namespace('job_once');

  beforeAll(async () => {
    redis = await ThrowawayRedis.start();
    admin = new Redis(redis.url);
    await admin.config('SET', 'maxmemory-policy', 'noeviction');
  });

  afterAll(async () => {
    admin?.disconnect();
    await redis?.stop();
  });

  it('resolves only once the retried completion is stored, so a redelivery after the process ended gets the result', async () => {
    const env = { STORE: 'redis', STORE_URL: redis.url, PREFIX: ns, ORDER_ID: 'order-7', LEASE_MS: '3000', STORE_TIMEOUT_MS: '1000' };
    const first = runOnce(env);
    await waitForLine(first, 'RUN {"orderId":"order-7"}');
    // While the job runs, Redis starts refusing writes (at maxmemory with noeviction): its
    // completion fails, and is retried in the background.
    await admin.config('SET', 'maxmemory', '1');
    first.go();
    await waitForLine(first, 'STORE-ERROR {"operation":"complete"}');
    await admin.config('SET', 'maxmemory', '0');
    expect(await first.exited).toBe(0);

    const lines = first.lines();
    const stored = lines.indexOf('COMPLETED {"stored":true}');
    const resolved = lines.findIndex((l) => l.startsWith('RESOLVED '));
    expect(stored, lines.join('\n')).toBeGreaterThan(-1);
    expect(resolved, lines.join('\n')).toBeGreaterThan(stored);
    // The record is the completed one, well before its 3 s lease could have run out.
    expect((await admin.get(`${ns}:-:order-7`))?.slice(0, 2)).toBe('d:');

    // The message redelivered to a fresh process: the stored result, the job not run again.
    const second = runOnce(env);
    expect(await second.exited).toBe(0);
    expect(second.lines().filter((l) => l.startsWith('RUN '))).toEqual([]);
    expect(second.lines().find((l) => l.startsWith('RESOLVED '))).toBe(lines[resolved]);
  });

  it('stopped (SIGTERM) while its call waits on a failed completion, a worker that closes the store exits at once with the result, not when the lease runs out', async () => {
    // A 30 s lease, as long as Kubernetes waits between SIGTERM and SIGKILL.
    const env = { STORE: 'redis', STORE_URL: redis.url, PREFIX: ns, ORDER_ID: 'order-8', LEASE_MS: '30000', STORE_TIMEOUT_MS: '1000' };
    const run = runOnce(env);
    await waitForLine(run, 'RUN {"orderId":"order-8"}');
    await admin.config('SET', 'maxmemory', '1');
    let stoppedFor: number;
    try {
      run.go();
      await waitForLine(run, 'STORE-ERROR {"operation":"complete"}');
      const stoppedAt = performance.now();
      run.terminate();
      expect(await run.exited).toBe(0);
      stoppedFor = performance.now() - stoppedAt;
    } finally {
      await admin.config('SET', 'maxmemory', '0');
    }
    const lines = run.lines();
    // Before, the call went on retrying the closed store until the lease ran out (about 30 s),
    // and the process with it: a pod would have been killed before it answered.
    expect(stoppedFor, lines.join('\n')).toBeLessThan(5_000);
    const resolved = lines.find((l) => l.startsWith('RESOLVED '));
    expect(resolved, lines.join('\n')).toMatch(/^RESOLVED \{"chargeId":"ch_order-8_\d+"\}$/);
    // It says the result was not stored.
    expect(lines).toContain('COMPLETED {"stored":false}');
    expect(lines).toContain('LEASE-LOST {"operation":"complete"}');
    expect(lines.indexOf('SIGTERM {}')).toBeLessThan(lines.indexOf(resolved!));
  });
});
