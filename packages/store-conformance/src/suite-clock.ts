import type { IdempotencyStore } from '@idemkit/core';
import { expect, it, vi } from 'vitest';
import {
  LONG_MS,
  SHORT_MS,
  SKEW_MS,
  acquire,
  asToken,
  clause,
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
      // The real time while Date is faked: the wall clock now plus elapsed monotonic time.
      const wallAt = Date.now();
      const monotonicAt = performance.now();
      const realNow = (): number => wallAt + (performance.now() - monotonicAt);
      /**
       * Run `op` and return the real times just before it was sent and just after it answered:
       * the store's clock read during it lies in between (± SKEW_MS). Each time is checked against
       * its own operation, not against the start of the clause, so a slow backend's round trips
       * (a remote one, or one on a loaded machine) do not add up past the tolerance; an hour of
       * skew stays far outside it.
       */
      const timed = async <T>(op: () => Promise<T>): Promise<{ value: T; from: number; to: number }> => {
        const from = realNow();
        const value = await op();
        return { value, from, to: realNow() };
      };
      const expectDuring = (value: number, during: { from: number; to: number }, plusMs = 0): void => {
        expect(value).toBeGreaterThanOrEqual(during.from + plusMs - SKEW_MS);
        expect(value).toBeLessThanOrEqual(during.to + plusMs + SKEW_MS);
      };
      // Only Date is faked (timers stay real), and it keeps running from the shifted time.
      vi.useFakeTimers({ toFake: ['Date'], shouldAdvanceTime: true });
      let token = asToken('');
      let opened: IdempotencyStore | undefined;
      try {
        vi.setSystemTime(wallAt + offset);
        // Created under the skew, like a store on an app server whose clock is off: one that kept
        // a reference to `Date.now` (`options.now ?? Date.now`) reads the skewed clock too.
        const skewed = await ctx.options.createStore();
        opened = skewed;
        const begun = await timed(() => acquire(skewed, lease, LONG_MS));
        token = begun.value;
        const record = await mustGet(skewed, lease);
        expectDuring(record.createdAt, begun);
        expectDuring(record.leaseExpiresAt ?? 0, begun, LONG_MS);
        const again = await timed(() => skewed.begin(lease, 'fp', LONG_MS));
        expect(again.value.kind).toBe('existing');
        // Time left = lease end (set during `begun`) − the store's now (during `again`).
        if (again.value.kind === 'existing') {
          expect(again.value.leaseRemainingMs).toBeGreaterThanOrEqual(LONG_MS - (again.to - begun.from) - SKEW_MS);
          expect(again.value.leaseRemainingMs).toBeLessThanOrEqual(LONG_MS - (again.from - begun.to) + SKEW_MS);
        }

        const doneToken = await acquire(skewed, done, LONG_MS);
        const completing = await timed(() => skewed.complete(done, doneToken, textResponse('dated by the store'), LONG_MS));
        expect(completing.value).toBe(true);
        expectDuring((await mustGet(skewed, done)).expiresAt, completing, LONG_MS);

        const renewing = await timed(() => skewed.renew(lease, token, 2 * LONG_MS));
        expect(renewing.value).toBe(true);
        expectDuring((await mustGet(skewed, lease)).leaseExpiresAt ?? 0, renewing, 2 * LONG_MS);

        await acquire(skewed, short, SHORT_MS);
        // A purge dated by a fast app clock deletes every record of the next hour.
        await skewed.purgeExpired();
        expect((await mustGet(skewed, lease)).state).toBe('in_progress');
        expect((await mustGet(skewed, done)).state).toBe('completed');
      } finally {
        vi.useRealTimers();
        await opened?.close();
      }
      // Back on the real clock, through the suite's store: the short lease ends by the store's
      // clock, the long ones do not.
      await waitUntilGone(store(), short);
      expect((await mustGet(store(), done)).state).toBe('completed');
      expect(await store().complete(lease, token, textResponse('done'), LONG_MS)).toBe(true);
    });
  }
}
