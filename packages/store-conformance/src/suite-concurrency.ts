import type { BeginResult, IdempotencyStore } from '@idemkit/core';
import { describe, expect } from 'vitest';
import {
  LONG_MS,
  SHORT_MS,
  acquire,
  clause,
  expectNear,
  expectSameResponse,
  mustGet,
  textResponse,
  useStore,
  waitForExpiry,
  waitUntilGone,
  type SuiteContext,
} from './context.js';

const RACERS = 200;

/** Exactly one `acquired`; every loser sees the winner's complete in-progress record. */
function expectOneWinner(results: readonly BeginResult[], fingerprints: readonly string[]): number {
  const winners = results.flatMap((r, i) => (r.kind === 'acquired' ? [i] : []));
  expect(winners).toHaveLength(1);
  const winner = winners[0] ?? -1;
  for (const result of results) {
    if (result.kind !== 'existing') continue;
    // No half-written record is ever visible to a loser.
    expect(result.record.state).toBe('in_progress');
    expect(result.record.fingerprint).toBe(fingerprints[winner]);
    expect(result.leaseRemainingMs).toBeGreaterThan(0);
  }
  return winner;
}

/** SPEC §3 "exactly one of N concurrent callers wins", through the store's real client(s). */
export function concurrencySuite(ctx: SuiteContext): void {
  const store = useStore(ctx);

  clause(`${RACERS} concurrent begin on one key: exactly one acquired, ${RACERS - 1} existing`, async () => {
    const key = ctx.key('race');
    const fingerprints = Array.from({ length: RACERS }, (_, i) => `fp-${i}`);
    const results = await Promise.all(fingerprints.map((fp) => store().begin(key, fp, LONG_MS)));
    expectOneWinner(results, fingerprints);
    expect(results.filter((r) => r.kind === 'existing')).toHaveLength(RACERS - 1);
  });

  clause('50 keys × 4 concurrent begins: exactly one winner per key', async () => {
    const keys = Array.from({ length: 50 }, () => ctx.key('race-many'));
    const calls = keys.flatMap((key) => [0, 1, 2, 3].map((i) => ({ key, fp: `${key}#${i}` })));
    const results = await Promise.all(calls.map((c) => store().begin(c.key, c.fp, LONG_MS)));
    for (const key of keys) {
      const mine = results.filter((_, i) => calls[i]?.key === key);
      expect(mine.filter((r) => r.kind === 'acquired')).toHaveLength(1);
    }
  });

  clause(`${RACERS} concurrent begin on an expired lease: exactly one takes over (tookOver true)`, async () => {
    const key = ctx.key('race-takeover');
    const stale = await acquire(store(), key, SHORT_MS);
    await waitUntilGone(store(), key);
    const fingerprints = Array.from({ length: RACERS }, (_, i) => `fp-${i}`);
    const results = await Promise.all(fingerprints.map((fp) => store().begin(key, fp, LONG_MS)));
    const winner = results[expectOneWinner(results, fingerprints)];
    expect(winner?.kind === 'acquired' && winner.tookOver).toBe(true);
    expect(winner?.kind === 'acquired' && winner.token !== stale).toBe(true);
  });

  clause(`${RACERS} concurrent begin on an expired completed record: exactly one acquires (tookOver false)`, async () => {
    const key = ctx.key('race-expired-done');
    const token = await acquire(store(), key, LONG_MS);
    expect(await store().complete(key, token, textResponse('old'), SHORT_MS)).toBe(true);
    // Not by reading the key (a get() may delete the expired record): begin itself must see it expired.
    await waitForExpiry(store(), ctx);
    const fingerprints = Array.from({ length: RACERS }, (_, i) => `fp-${i}`);
    const results = await Promise.all(fingerprints.map((fp) => store().begin(key, fp, LONG_MS)));
    const winner = results[expectOneWinner(results, fingerprints)];
    expect(winner?.kind === 'acquired' && winner.tookOver).toBe(false);
  });

  clause('concurrent complete with the same token: exactly one true, and its response is stored', async () => {
    const key = ctx.key('race-complete');
    const token = await acquire(store(), key, LONG_MS);
    const responses = Array.from({ length: 20 }, (_, i) => textResponse(`attempt ${i}`));
    const oks = await Promise.all(responses.map((r) => store().complete(key, token, r, LONG_MS)));
    expect(oks.filter(Boolean)).toHaveLength(1);
    const stored = responses[oks.indexOf(true)];
    if (stored) expectSameResponse((await mustGet(store(), key)).response, stored);
  });

  clause('late complete racing a takeover: exactly one of them succeeds, per key', async () => {
    const keys = Array.from({ length: 20 }, () => ctx.key('race-late'));
    const stale = await Promise.all(keys.map((key) => acquire(store(), key, SHORT_MS)));
    await waitUntilGone(store(), ...keys);
    const outcomes = await Promise.all(
      keys.map((key, i) =>
        Promise.all([store().complete(key, stale[i]!, textResponse('late'), LONG_MS), store().begin(key, 'fp', LONG_MS)]),
      ),
    );
    for (const [completedOk, begun] of outcomes) {
      // A lease that ran out is over (suite-lease pins it), so the newcomer is the one; that both
      // the late holder and the newcomer believe they own the key is never allowed in any case.
      expect(completedOk !== (begun.kind === 'acquired')).toBe(true);
    }
  });

  clause('late release racing a takeover: the newcomer keeps its record and completes, per key', async () => {
    const keys = Array.from({ length: 20 }, () => ctx.key('race-late-release'));
    const stale = await Promise.all(keys.map((key) => acquire(store(), key, SHORT_MS)));
    await waitUntilGone(store(), ...keys);
    const outcomes = await Promise.all(keys.map((key, i) => Promise.all([store().release(key, stale[i]!), store().begin(key, 'fp', LONG_MS)])));
    await Promise.all(
      outcomes.map(async ([, begun], i) => {
        // A release that checked the token, then deleted whatever was there, would delete the
        // newcomer's record: its completion would then fail, and a third caller could run.
        expect(begun.kind).toBe('acquired');
        if (begun.kind !== 'acquired') return;
        expect(await store().complete(keys[i]!, begun.token, textResponse('newcomer'), LONG_MS)).toBe(true);
      }),
    );
  });

  clause('release racing complete with the same token: exactly one succeeds, and the record says which, per key', async () => {
    // The holder's own two calls (an engine that gives the key up on a client leaving while the
    // handler's answer is stored) are the only way to change a live record under a check-then-
    // delete release, so they catch one without waiting for a lease to run out: a release that
    // checked the token, then deleted whatever was there, deletes the completed record (both
    // true, the stored answer lost, and the key runs a second time).
    const keys = Array.from({ length: 20 }, () => ctx.key('race-release-complete'));
    const tokens = await Promise.all(keys.map((key) => acquire(store(), key, LONG_MS)));
    const response = textResponse('completed');
    const outcomes = await Promise.all(
      keys.map(async (key, i) => {
        const release = (): Promise<boolean> => store().release(key, tokens[i]!);
        const complete = (): Promise<boolean> => store().complete(key, tokens[i]!, response, LONG_MS);
        // Both orders of sending, so neither call is always the first to reach the store.
        if (i % 2 === 0) return Promise.all([release(), complete()]);
        const [completed, released] = await Promise.all([complete(), release()]);
        return [released, completed] as const;
      }),
    );
    await Promise.all(
      outcomes.map(async ([released, completed], i) => {
        expect(released !== completed).toBe(true);
        const record = await store().get(keys[i]!);
        if (completed) expectSameResponse(record?.response, response);
        else expect(record).toBeUndefined();
      }),
    );
  });

  // The engine's renewal clock can have a renewal in flight while the answer is stored. A renew
  // that checked the token, then wrote the lease end over whatever was there, cut the completed
  // record's TTL to a lease (found by mutation testing the suite).
  clause('renew racing complete with the same token: the completed record keeps its TTL, per key', async () => {
    const keys = Array.from({ length: 20 }, () => ctx.key('race-renew-complete'));
    const tokens = await Promise.all(keys.map((key) => acquire(store(), key, LONG_MS)));
    const ttlMs = 3 * LONG_MS; // far from the renewed lease end (LONG_MS from now)
    const before = Date.now();
    const outcomes = await Promise.all(
      keys.map(async (key, i) => {
        const renew = (): Promise<boolean> => store().renew(key, tokens[i]!, LONG_MS);
        const complete = (): Promise<boolean> => store().complete(key, tokens[i]!, textResponse('done'), ttlMs);
        // Both orders of sending, so neither call is always the first to reach the store.
        if (i % 2 === 0) return (await Promise.all([renew(), complete()]))[1];
        return (await Promise.all([complete(), renew()]))[0];
      }),
    );
    await Promise.all(
      outcomes.map(async (completedOk, i) => {
        expect(completedOk).toBe(true);
        const record = await mustGet(store(), keys[i]!);
        expect(record.state).toBe('completed');
        expect(record.leaseExpiresAt).toBeNull();
        expectNear(record.expiresAt, before + ttlMs);
        expect(await store().renew(keys[i]!, tokens[i]!, LONG_MS)).toBe(false);
      }),
    );
  });

  clause('purgeExpired racing takeovers of expired leases: every record taken over survives', async () => {
    const keys = Array.from({ length: 20 }, () => ctx.key('race-purge'));
    await Promise.all(keys.map((key) => acquire(store(), key, SHORT_MS)));
    await waitUntilGone(store(), ...keys);
    const [, ...begun] = await Promise.all([store().purgeExpired(), ...keys.map((key) => store().begin(key, 'fp', LONG_MS))]);
    await Promise.all(
      begun.map(async (result, i) => {
        // A purge that listed expired keys and then deleted by key without checking expiry again
        // would delete records just taken over.
        expect(result.kind).toBe('acquired');
        expect((await mustGet(store(), keys[i]!)).state).toBe('in_progress');
      }),
    );
  });

  if (ctx.options.createSecondStore) {
    describe('across two clients', () => {
      const second = useStore(ctx, ctx.options.createSecondStore);

      clause('a record written through one client is seen through the other', async () => {
        const key = ctx.key('two-clients');
        const token = await acquire(store(), key, LONG_MS, 'fp-one');
        expect((await mustGet(second(), key)).fingerprint).toBe('fp-one');
        const again = await second().begin(key, 'fp-two', LONG_MS);
        expect(again.kind).toBe('existing');
        const response = textResponse('via first');
        expect(await store().complete(key, token, response, LONG_MS)).toBe(true);
        expectSameResponse((await mustGet(second(), key)).response, response);
      });

      clause(`${RACERS} concurrent begin split across two clients: exactly one winner`, async () => {
        const key = ctx.key('race-two-clients');
        const fingerprints = Array.from({ length: RACERS }, (_, i) => `fp-${i}`);
        const stores: IdempotencyStore[] = [store(), second()];
        const results = await Promise.all(fingerprints.map((fp, i) => stores[i % 2]!.begin(key, fp, LONG_MS)));
        expectOneWinner(results, fingerprints);
      });

      clause('a takeover through one client fences the stale holder on the other (tokens unique across clients)', async () => {
        const key = ctx.key('two-clients-fence');
        const stale = await acquire(store(), key, SHORT_MS);
        await waitUntilGone(store(), key);
        const fresh = await acquire(second(), key, LONG_MS);
        expect(fresh).not.toBe(stale);
        expect(await store().complete(key, stale, textResponse('late'), LONG_MS)).toBe(false);
        expect(await second().complete(key, fresh, textResponse('newcomer'), LONG_MS)).toBe(true);
        expectSameResponse((await mustGet(store(), key)).response, textResponse('newcomer'));
      });

      clause('an expired lease raced across two clients: exactly one takes over', async () => {
        const key = ctx.key('race-two-clients-takeover');
        await acquire(store(), key, SHORT_MS);
        await waitUntilGone(store(), key);
        const fingerprints = Array.from({ length: RACERS }, (_, i) => `fp-${i}`);
        const stores: IdempotencyStore[] = [store(), second()];
        const results = await Promise.all(fingerprints.map((fp, i) => stores[i % 2]!.begin(key, fp, LONG_MS)));
        const winner = results[expectOneWinner(results, fingerprints)];
        expect(winner?.kind === 'acquired' && winner.tookOver).toBe(true);
      });
    });
  }
}
