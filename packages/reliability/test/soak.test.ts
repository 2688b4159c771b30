/**
 * Issue 10.7, quick size: the soak module (soak.mjs runs it for minutes) for a few seconds on
 * Redis, so the normal test run keeps it working. The long run is `pnpm --filter @idemkit/reliability soak`.
 */
import { expect, it } from 'vitest';
import { runSoak, summary } from '../src/soak.js';

it('a 5 s soak on Redis: executions == distinct keys, no record in progress, no heap growth', async () => {
  const report = await runSoak({ store: 'redis', seconds: 5, concurrency: 8 });
  expect(report.failures, summary(report)).toEqual([]);
  expect(report.keys).toBeGreaterThan(50);
  expect(report.executions).toBe(report.keys);
  expect(report.inProgressLeft).toBe(0);
});
