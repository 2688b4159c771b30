import { expect, it, vi } from 'vitest';
import {
  LONG_MS,
  SHORT_MS,
  acquire,
  asToken,
  clause,
  expectNear,
  mustGet,
  textResponse,
  useStore,
  waitUntilGone,
  type SuiteContext,
} from './context.js';

const HOUR_MS = 60 * 60_000;

/**
 * SPEC §3 "time comes from the store's clock": with this process's clock an hour fast or slow,
 * leases, TTLs, the time left and purges are still dated by the backend. A store that dates
 * them by `Date.now()` writes leases an hour too long (or already over), and a purge on a fast
 * app server deletes live records.
 */
export function clockSuite(ctx: SuiteContext): void {
  if (ctx.options.processClock) {
    it.skip("time comes from the store's clock (skipped: `processClock`, the store's clock is this process's)", () => undefined);
    return;
  }
  const store = useStore(ctx);

  for (const offset of [HOUR_MS, -HOUR_MS]) {
    const label = offset > 0 ? 'an hour fast' : 'an hour slow';
    clause(`with this process's clock ${label}, leases, TTLs, renew and purge go by the store's clock`, async () => {
      const lease = ctx.key('clock-lease');
      const done = ctx.key('clock-done');
      const short = ctx.key('clock-short');
      const before = Date.now();
      // Only Date is faked (timers stay real), and it keeps running from the shifted time.
      vi.useFakeTimers({ toFake: ['Date'], shouldAdvanceTime: true });
      let token = asToken('');
      try {
        vi.setSystemTime(before + offset);
        token = await acquire(store(), lease, LONG_MS);
        const record = await mustGet(store(), lease);
        expectNear(record.createdAt, before);
        expectNear(record.leaseExpiresAt ?? 0, before + LONG_MS);
        const again = await store().begin(lease, 'fp', LONG_MS);
        expect(again.kind).toBe('existing');
        if (again.kind === 'existing') expectNear(again.leaseRemainingMs, LONG_MS);

        const doneToken = await acquire(store(), done, LONG_MS);
        expect(await store().complete(done, doneToken, textResponse('dated by the store'), LONG_MS)).toBe(true);
        expectNear((await mustGet(store(), done)).expiresAt, before + LONG_MS);

        expect(await store().renew(lease, token, 2 * LONG_MS)).toBe(true);
        expectNear((await mustGet(store(), lease)).leaseExpiresAt ?? 0, before + 2 * LONG_MS);

        await acquire(store(), short, SHORT_MS);
        // A purge dated by a fast app clock deletes every record of the next hour.
        await store().purgeExpired();
        expect((await mustGet(store(), lease)).state).toBe('in_progress');
        expect((await mustGet(store(), done)).state).toBe('completed');
      } finally {
        vi.useRealTimers();
      }
      // Back on the real clock: the short lease ends by the store's clock, the long ones do not.
      await waitUntilGone(store(), short);
      expect((await mustGet(store(), done)).state).toBe('completed');
      expect(await store().complete(lease, token, textResponse('done'), LONG_MS)).toBe(true);
    });
  }
}
