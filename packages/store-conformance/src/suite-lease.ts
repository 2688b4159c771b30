import { expect, vi } from 'vitest';
import {
  LONG_MS,
  PROMPT_MS,
  SHORT_MS,
  WAIT,
  acquire,
  asToken,
  clause,
  expectNear,
  expectSameResponse,
  mustGet,
  snapshot,
  textResponse,
  useStore,
  waitUntilGone,
  type SuiteContext,
} from './context.js';

/** SPEC §3 leases: takeover after expiry, fencing of the stale holder, renew, release. */
export function leaseSuite(ctx: SuiteContext): void {
  const store = useStore(ctx);

  clause('an in-progress record whose lease ran out is not live: get() → undefined, as soon as the lease ends', async () => {
    const key = ctx.key('lease-expired-get');
    const sentAt = performance.now();
    await acquire(store(), key, SHORT_MS);
    await waitUntilGone(store(), key);
    // Not a grace period later: a crashed holder's key would stay locked (409s) that much longer.
    expect(performance.now() - sentAt, 'gone ms after begin').toBeLessThan(SHORT_MS + PROMPT_MS);
    const next = await store().begin(key, 'fp', LONG_MS);
    expect(next.kind === 'acquired' && next.tookOver).toBe(true);
  });

  // The clause above measures by this process's clock, with PROMPT_MS of slack for the store's: a
  // store that kept records a second past their end (a "grace" in its checks) passed it (found by
  // mutation testing the suite). Here the store's own clock is read, through a probe record's
  // createdAt taken just before each read, so no slack is needed.
  clause("a lease and a TTL end at the record's own expiresAt by the store's clock: no grace period", async () => {
    const lease = ctx.key('no-grace-lease');
    await acquire(store(), lease, SHORT_MS);
    const done = ctx.key('no-grace-done');
    const token = await acquire(store(), done, LONG_MS);
    expect(await store().complete(done, token, textResponse('short'), SHORT_MS)).toBe(true);
    const ends = new Map([
      [lease, (await mustGet(store(), lease)).expiresAt],
      [done, (await mustGet(store(), done)).expiresAt],
    ]);
    const late: string[] = [];
    // Collected, not expected inside waitFor: it would retry a violation away until the grace ran out.
    await vi.waitFor(async () => {
      const probe = ctx.key('no-grace-probe');
      await acquire(store(), probe, SHORT_MS);
      const storeNow = (await mustGet(store(), probe)).createdAt;
      for (const [key, end] of [...ends]) {
        if ((await store().get(key)) === undefined) ends.delete(key);
        else if (storeNow > end) late.push(`${key} still live ${storeNow - end} ms after its expiresAt`);
      }
      expect(ends.size).toBe(0);
    }, WAIT);
    expect(late).toEqual([]);
  });

  clause('a lease that ran out is over even before anyone takes over: its holder can neither renew nor complete it', async () => {
    const key = ctx.key('lease-lapsed');
    const lapsed = await acquire(store(), key, SHORT_MS);
    await waitUntilGone(store(), key);
    // Renewing it back to life would let a stalled holder finish as if nothing happened, while a
    // request arriving in between already took (or could have taken) the key over.
    expect(await store().renew(key, lapsed, LONG_MS)).toBe(false);
    expect(await store().complete(key, lapsed, textResponse('late'), LONG_MS)).toBe(false);
    // Nor release it: that would delete what the next caller must see as a takeover.
    expect(await store().release(key, lapsed)).toBe(false);
    expect(await store().get(key)).toBeUndefined();
    const next = await store().begin(key, 'fp', LONG_MS);
    expect(next.kind === 'acquired' && next.tookOver).toBe(true);
  });

  clause('a live lease is never taken over before the time left that begin reported has passed', async () => {
    const key = ctx.key('lease-no-early-takeover');
    const leaseMs = 1_500;
    await acquire(store(), key, leaseMs);
    // Ask until the takeover; each "existing" answer promises its lease for the time it reports.
    let promised = { askedAt: 0, remainingMs: 0 };
    for (;;) {
      const askedAt = Date.now();
      const result = await store().begin(key, 'fp-next', LONG_MS);
      if (result.kind === 'existing') {
        expect(result.leaseRemainingMs).toBeGreaterThan(0);
        expect(result.leaseRemainingMs).toBeLessThanOrEqual(leaseMs);
        promised = { askedAt, remainingMs: result.leaseRemainingMs };
        await new Promise((resolve) => setTimeout(resolve, 20));
        continue;
      }
      expect(result.tookOver).toBe(true);
      // The store computed that time after it was asked; a few ms of rounding are allowed.
      expect(Date.now() - promised.askedAt).toBeGreaterThanOrEqual(promised.remainingMs - 5);
      break;
    }
  });

  clause('after the lease runs out, begin takes over with a new token (tookOver true) and the new fingerprint', async () => {
    const key = ctx.key('lease-takeover');
    const stale = await acquire(store(), key, SHORT_MS, 'fp-crashed');
    const crashedAt = (await mustGet(store(), key)).createdAt;
    await waitUntilGone(store(), key);

    const beforeTakeover = Date.now();
    const result = await store().begin(key, 'fp-next', LONG_MS);
    expect(result.kind).toBe('acquired');
    if (result.kind !== 'acquired') return;
    expect(result.tookOver).toBe(true);
    expect(result.token).not.toBe(stale);

    const record = await mustGet(store(), key);
    expect(record.state).toBe('in_progress');
    // The new holder's request is the one whose response will be stored.
    expect(record.fingerprint).toBe('fp-next');
    expectNear(record.leaseExpiresAt ?? 0, Date.now() + LONG_MS);
    // A new record, begun by the takeover (not the crashed holder's).
    expect(record.createdAt).toBeGreaterThan(crashedAt);
    expectNear(record.createdAt, beforeTakeover);
  });

  clause('the stale holder can neither complete, release nor renew; the new holder still completes', async () => {
    const key = ctx.key('lease-stale');
    const stale = await acquire(store(), key, SHORT_MS);
    await waitUntilGone(store(), key);
    const fresh = await acquire(store(), key, LONG_MS);
    const held = snapshot(await store().get(key));

    expect(await store().complete(key, stale, textResponse('late'), LONG_MS)).toBe(false);
    expect(await store().release(key, stale)).toBe(false);
    expect(await store().renew(key, stale, LONG_MS)).toBe(false);
    expect(snapshot(await store().get(key))).toEqual(held);

    const response = textResponse('from the new holder');
    expect(await store().complete(key, fresh, response, LONG_MS)).toBe(true);
    expectSameResponse((await mustGet(store(), key)).response, response);
    // And the stale token cannot overwrite the completed record either.
    expect(await store().complete(key, stale, textResponse('late'), LONG_MS)).toBe(false);
    expectSameResponse((await mustGet(store(), key)).response, response);
  });

  clause('renew keeps the record in progress past the original lease end', async () => {
    const key = ctx.key('lease-renew');
    const token = await acquire(store(), key, SHORT_MS);
    expect(await store().renew(key, token, LONG_MS)).toBe(true);
    // A canary begun after the renew with the same short lease: once it has expired by the
    // store's own clock, the original lease end has certainly passed too.
    const canary = ctx.key('lease-renew-canary');
    await acquire(store(), canary, SHORT_MS);
    await waitUntilGone(store(), canary);

    const record = await mustGet(store(), key);
    expect(record.state).toBe('in_progress');
    const again = await store().begin(key, 'fp', LONG_MS);
    expect(again.kind).toBe('existing');
    if (again.kind === 'existing') expect(again.leaseRemainingMs).toBeGreaterThan(LONG_MS - 60_000);
    expect(await store().complete(key, token, textResponse('done'), LONG_MS)).toBe(true);
  });

  clause('renew sets the lease end to now + lease (record expiresAt follows); the record keeps its createdAt', async () => {
    const key = ctx.key('lease-renew-end');
    const token = await acquire(store(), key, LONG_MS);
    const { createdAt } = await mustGet(store(), key);
    // Let the store's clock move on, so a renew that restamps createdAt shows.
    await vi.waitFor(async () => {
      const again = await store().begin(key, 'fp', LONG_MS);
      expect(again.kind).toBe('existing');
      if (again.kind === 'existing') expect(again.leaseRemainingMs).toBeLessThanOrEqual(LONG_MS - 10);
    }, WAIT);
    const renewedMs = 3 * LONG_MS;
    const before = Date.now();
    expect(await store().renew(key, token, renewedMs)).toBe(true);
    const record = await mustGet(store(), key);
    expectNear(record.leaseExpiresAt ?? 0, before + renewedMs);
    expect(Math.abs(record.expiresAt - (record.leaseExpiresAt ?? 0))).toBeLessThanOrEqual(1);
    expect(record.createdAt).toBe(createdAt);
  });

  clause('renew can also shorten the lease: the record goes once the shorter lease ends', async () => {
    const key = ctx.key('lease-renew-shorter');
    const token = await acquire(store(), key, LONG_MS);
    const before = Date.now();
    expect(await store().renew(key, token, SHORT_MS)).toBe(true);
    expectNear((await mustGet(store(), key)).leaseExpiresAt ?? 0, before + SHORT_MS);
    await waitUntilGone(store(), key);
    expect((await store().begin(key, 'fp', LONG_MS)).kind).toBe('acquired');
  });

  clause('renew with a wrong, forged or empty token returns false and leaves the lease alone', async () => {
    const key = ctx.key('lease-renew-wrong');
    await acquire(store(), key, LONG_MS);
    const other = await acquire(store(), ctx.key('lease-renew-wrong-other'), LONG_MS);
    const held = snapshot(await store().get(key));
    for (const token of [other, asToken(`' OR '1'='1`), asToken('')]) {
      expect(await store().renew(key, token, 3 * LONG_MS)).toBe(false);
    }
    expect(snapshot(await store().get(key))).toEqual(held);
  });

  clause('release with the token deletes the record; the next begin acquires fresh (tookOver false)', async () => {
    const key = ctx.key('lease-release');
    const token = await acquire(store(), key, LONG_MS);
    expect(await store().release(key, token)).toBe(true);
    expect(await store().get(key)).toBeUndefined();
    expect(await store().release(key, token)).toBe(false);

    const next = await store().begin(key, 'fp', LONG_MS);
    expect(next.kind).toBe('acquired');
    if (next.kind !== 'acquired') return;
    expect(next.tookOver).toBe(false);
    expect(next.token).not.toBe(token);
    // The released token does not come back to life on the new record.
    expect(await store().complete(key, token, textResponse('old'), LONG_MS)).toBe(false);
  });

  clause('release with a wrong, forged or empty token returns false and keeps the record', async () => {
    const key = ctx.key('lease-release-wrong');
    await acquire(store(), key, LONG_MS);
    const other = await acquire(store(), ctx.key('lease-release-wrong-other'), LONG_MS);
    const held = snapshot(await store().get(key));
    for (const token of [other, asToken(`' OR '1'='1`), asToken('')]) {
      expect(await store().release(key, token)).toBe(false);
    }
    expect(snapshot(await store().get(key))).toEqual(held);
  });

  // Two stores on one backend: only with a second client (two calls of createStore may be two
  // separate backends, as for an in-memory store).
  const createSecond = ctx.options.createSecondStore;
  if (createSecond) {
    clause('fresh store instances (a restarted process) mint other tokens: a takeover through one fences the other', async () => {
      const first = await ctx.options.createStore();
      const second = await createSecond();
      try {
        const key = ctx.key('lease-fresh-stores');
        const stale = await acquire(first, key, SHORT_MS);
        await waitUntilGone(first, key);
        const result = await second.begin(key, 'fp', LONG_MS);
        expect(result.kind === 'acquired' && result.tookOver).toBe(true);
        if (result.kind !== 'acquired') return;
        expect(result.token).not.toBe(stale);
        expect(await first.complete(key, stale, textResponse('late'), LONG_MS)).toBe(false);
        expect(await second.complete(key, result.token, textResponse('newcomer'), LONG_MS)).toBe(true);
        expectSameResponse((await mustGet(first, key)).response, textResponse('newcomer'));
      } finally {
        await first.close();
        await second.close();
      }
    });
  }
}
