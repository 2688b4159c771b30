import type { IdempotencyStore } from '@idemkit/core';
import { expect } from 'vitest';
import {
  LONG_MS,
  SHORT_MS,
  acquire,
  clause,
  completed,
  mustGet,
  textResponse,
  useStore,
  waitForExpiry,
  waitUntilGone,
  type SuiteContext,
} from './context.js';

/** Delete whatever expired before this test, so its counts are its own. */
async function drain(store: IdempotencyStore): Promise<void> {
  for (let i = 0; i < 10_000; i++) {
    if ((await store.purgeExpired(1_000)) === 0) return;
  }
  throw new Error('purgeExpired(1000) never reached 0');
}

/** `expiredCompleted` completed records with a short TTL plus `expiredLeases` abandoned short leases. */
async function makeExpired(
  store: IdempotencyStore,
  ctx: SuiteContext,
  expiredCompleted: number,
  expiredLeases: number,
): Promise<{ completedKeys: string[]; leaseKeys: string[] }> {
  const completedKeys = Array.from({ length: expiredCompleted }, () => ctx.key('purge-done'));
  const leaseKeys = Array.from({ length: expiredLeases }, () => ctx.key('purge-lease'));
  await Promise.all([
    ...completedKeys.map(async (key) => {
      const token = await acquire(store, key, LONG_MS);
      expect(await store.complete(key, token, textResponse('expiring'), SHORT_MS)).toBe(true);
    }),
    ...leaseKeys.map((key) => acquire(store, key, SHORT_MS)),
  ]);
  await waitForExpiry(store, ctx);
  return { completedKeys, leaseKeys };
}

/** Live for a few seconds more: a purge that deletes ahead of time ("expires soon") takes them. */
const SOON_MS = 3_000;

/**
 * A completed record and a lease that both end SOON_MS after `sentAt` (this process's monotonic
 * clock, read before they were written, so they end no earlier than that by the store's clock).
 */
async function expiringSoon(store: IdempotencyStore, ctx: SuiteContext): Promise<{ keys: string[]; sentAt: number }> {
  const done = ctx.key('purge-soon-done');
  const lease = ctx.key('purge-soon-lease');
  const sentAt = performance.now();
  const token = await acquire(store, done, LONG_MS);
  expect(await store.complete(done, token, textResponse('soon'), SOON_MS)).toBe(true);
  await acquire(store, lease, SOON_MS);
  return { keys: [done, lease], sentAt };
}

/**
 * Records that were live during every purge must still be there. Only the elapsed time is
 * compared (no clock skew involved): read before SOON_MS has passed since they were written, they
 * were live then, and during the purges before.
 */
async function expectSurvived(store: IdempotencyStore, soon: { keys: string[]; sentAt: number }): Promise<void> {
  const records = await Promise.all(soon.keys.map((key) => store.get(key)));
  if (performance.now() - soon.sentAt >= SOON_MS) return; // too slow a run to tell
  for (const [i, record] of records.entries()) expect(record, `${soon.keys[i]} was live, yet purged`).toBeDefined();
}

/** SPEC §3 purgeExpired: batched, counts what it deleted, never touches live records. */
export function purgeSuite(ctx: SuiteContext): void {
  const store = useStore(ctx);

  // Shared by both branches: no exact counts, so nativeExpiry stores run it too.
  // Purged again and again up to their last quarter second: a purge with a safety margin ("ends
  // within N ms") passed a single purge right after the write (found by mutation testing the suite).
  const notEarly = (): void =>
    clause(`never purges ahead of time: records that end within ${SOON_MS / 1000} s stay until they end, purged up to their last moments`, async () => {
      const soon = await expiringSoon(store(), ctx);
      for (let i = 0; i < 100 && (await store().purgeExpired()) > 0; i++);
      while (performance.now() - soon.sentAt < SOON_MS - 250) {
        await store().purgeExpired();
        await new Promise((resolve) => setTimeout(resolve, 25));
      }
      await expectSurvived(store(), soon);
    });

  if (ctx.options.nativeExpiry) {
    clause('expired records vanish on their own (native expiry); purgeExpired returns a count >= 0', async () => {
      const liveLease = ctx.key('purge-live-lease');
      await acquire(store(), liveLease, LONG_MS);
      const liveDone = ctx.key('purge-live-done');
      await completed(store(), liveDone);
      // Completed within a short lease, kept for a long TTL: only the TTL counts once completed.
      const shortLeaseDone = ctx.key('purge-live-short-lease');
      const shortToken = await acquire(store(), shortLeaseDone, SHORT_MS);
      expect(await store().complete(shortLeaseDone, shortToken, textResponse('kept'), LONG_MS)).toBe(true);
      const { completedKeys, leaseKeys } = await makeExpired(store(), ctx, 15, 10);
      await waitUntilGone(store(), ...completedKeys, ...leaseKeys);

      const count = await store().purgeExpired(10);
      expect(Number.isInteger(count)).toBe(true);
      expect(count).toBeGreaterThanOrEqual(0);
      expect(count).toBeLessThanOrEqual(10);
      const all = await store().purgeExpired();
      expect(Number.isInteger(all)).toBe(true);
      expect(all).toBeGreaterThanOrEqual(0);
      expect((await mustGet(store(), liveLease)).state).toBe('in_progress');
      expect((await mustGet(store(), liveDone)).state).toBe('completed');
      expect((await mustGet(store(), shortLeaseDone)).state).toBe('completed');
    });
    notEarly();
    return;
  }

  clause('removes only expired records, in batches of `limit` (25 expired: 10, 10, 5, 0)', async () => {
    await drain(store());
    const liveLease = ctx.key('purge-live-lease');
    await acquire(store(), liveLease, LONG_MS);
    const liveDone = ctx.key('purge-live-done');
    await completed(store(), liveDone);
    // Completed within a short lease, kept for a long TTL: once completed, only the TTL counts,
    // however long ago its lease would have ended (makeExpired waits well past that).
    const shortLeaseDone = ctx.key('purge-live-short-lease');
    const shortToken = await acquire(store(), shortLeaseDone, SHORT_MS);
    expect(await store().complete(shortLeaseDone, shortToken, textResponse('kept'), LONG_MS)).toBe(true);
    const { completedKeys, leaseKeys } = await makeExpired(store(), ctx, 15, 10);

    expect(await store().purgeExpired(10)).toBe(10);
    expect(await store().purgeExpired(10)).toBe(10);
    expect(await store().purgeExpired(10)).toBe(5);
    expect(await store().purgeExpired(10)).toBe(0);

    expect((await mustGet(store(), liveLease)).state).toBe('in_progress');
    expect((await mustGet(store(), liveDone)).state).toBe('completed');
    expect((await mustGet(store(), shortLeaseDone)).state).toBe('completed');
    await waitUntilGone(store(), ...completedKeys, ...leaseKeys);
    // The expired leases are really deleted, not just counted: begin finds nothing to take over.
    for (const key of leaseKeys) {
      const result = await store().begin(key, 'fp', LONG_MS);
      expect(result.kind).toBe('acquired');
      if (result.kind === 'acquired') expect(result.tookOver).toBe(false);
    }
  });

  clause('purgeExpired() without a limit removes every expired record (in one or more calls)', async () => {
    await drain(store());
    await makeExpired(store(), ctx, 2, 1);
    let total = 0;
    for (let i = 0; i < 100; i++) {
      const n = await store().purgeExpired();
      expect(n).toBeGreaterThanOrEqual(0);
      if (n === 0) break;
      total += n;
    }
    expect(total).toBe(3);
  });
  notEarly();
}
