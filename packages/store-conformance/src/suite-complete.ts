import { expect } from 'vitest';
import {
  LONG_MS,
  acquire,
  asToken,
  clause,
  expectNear,
  expectSameResponse,
  mustGet,
  snapshot,
  textResponse,
  useStore,
  type SuiteContext,
} from './context.js';
import type { StoredResponse } from '@idemkit/core';

/** SPEC §3 complete: only the lease holder stores a response; replays see it exactly. */
export function completeSuite(ctx: SuiteContext): void {
  const store = useStore(ctx);
  const response: StoredResponse = {
    status: 201,
    headers: [
      ['content-type', 'application/json'],
      ['location', '/orders/42'],
    ],
    body: new TextEncoder().encode('{"id":42,"total":"9.99"}'),
  };

  clause('begin → complete → get/begin replay the exact response', async () => {
    const key = ctx.key('complete-roundtrip');
    const token = await acquire(store(), key, LONG_MS, 'fp-order');
    const inProgress = await mustGet(store(), key);
    const ttlMs = 2 * LONG_MS;
    const before = Date.now();
    expect(await store().complete(key, token, response, ttlMs)).toBe(true);
    const after = Date.now();

    const record = await mustGet(store(), key);
    expect(record.key).toBe(key);
    expect(record.state).toBe('completed');
    expect(record.fingerprint).toBe('fp-order');
    expect(record.leaseExpiresAt).toBeNull();
    expect(record.createdAt).toBe(inProgress.createdAt);
    expectNear(record.expiresAt, before + ttlMs);
    expectNear(record.expiresAt, after + ttlMs);
    expectSameResponse(record.response, response);

    const replay = await store().begin(key, 'fp-order', LONG_MS);
    expect(replay.kind).toBe('existing');
    if (replay.kind !== 'existing') return;
    expect(replay.leaseRemainingMs).toBe(0);
    expect(replay.record.state).toBe('completed');
    expect(replay.record.fingerprint).toBe('fp-order');
    expect(replay.record.leaseExpiresAt).toBeNull();
    expect(replay.record.expiresAt).toBe(record.expiresAt);
    expectSameResponse(replay.record.response, response);
    // A replay reads; it does not push the TTL further (it counts from the completion).
    expect((await mustGet(store(), key)).expiresAt).toBe(record.expiresAt);
  });

  clause('once completed, the old token can no longer complete, renew or release (false, nothing changes)', async () => {
    const key = ctx.key('complete-after');
    const token = await acquire(store(), key);
    expect(await store().complete(key, token, response, LONG_MS)).toBe(true);
    const stored = snapshot(await store().get(key));

    expect(await store().complete(key, token, textResponse('overwrite?', 200), LONG_MS)).toBe(false);
    expect(await store().renew(key, token, LONG_MS)).toBe(false);
    expect(await store().release(key, token)).toBe(false);

    expect(snapshot(await store().get(key))).toEqual(stored);
  });

  clause('complete with a token that does not hold the lease returns false and stores nothing', async () => {
    const key = ctx.key('complete-wrong');
    const token = await acquire(store(), key);
    const otherKey = ctx.key('complete-wrong-other');
    const otherToken = await acquire(store(), otherKey);
    const stored = snapshot(await store().get(key));

    expect(await store().complete(key, otherToken, textResponse('other'), LONG_MS)).toBe(false);
    expect(await store().complete(key, asToken(`' OR '1'='1`), textResponse('forged'), LONG_MS)).toBe(false);
    expect(await store().complete(key, asToken(''), textResponse('empty'), LONG_MS)).toBe(false);
    expect(snapshot(await store().get(key))).toEqual(stored);
    // The other key's token still works for its own key, and the holder still completes.
    expect(await store().complete(otherKey, otherToken, textResponse('other'), LONG_MS)).toBe(true);
    expect(await store().complete(key, token, response, LONG_MS)).toBe(true);
  });

  clause('complete, renew and release on an absent key return false and create nothing', async () => {
    const key = ctx.key('complete-absent');
    const token = await acquire(store(), ctx.key('complete-absent-holder'));
    expect(await store().complete(key, token, response, LONG_MS)).toBe(false);
    expect(await store().renew(key, token, LONG_MS)).toBe(false);
    expect(await store().release(key, token)).toBe(false);
    expect(await store().get(key)).toBeUndefined();
  });
}
