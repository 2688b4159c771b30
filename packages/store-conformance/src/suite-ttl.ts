import { expect } from 'vitest';
import {
  LONG_MS,
  PROMPT_MS,
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

/** SPEC §3 expiry of completed records. */
export function ttlSuite(ctx: SuiteContext): void {
  const store = useStore(ctx);

  clause('a completed record expires after its TTL; then begin acquires (tookOver false) and get → undefined', async () => {
    const key = ctx.key('ttl-expire');
    const token = await acquire(store(), key, LONG_MS);
    expect(await store().complete(key, token, textResponse('short-lived'), SHORT_MS)).toBe(true);
    // Not by reading the key: a get() that deletes the expired record would hide a begin that
    // still answers with it (a replay of an expired response, or a takeover of a completed record).
    await waitForExpiry(store(), ctx);

    const next = await store().begin(key, 'fp', LONG_MS);
    expect(next.kind).toBe('acquired');
    if (next.kind !== 'acquired') return;
    expect(next.tookOver).toBe(false);
    const record = await mustGet(store(), key);
    expect(record.state).toBe('in_progress');
    expect(record.response).toBeNull();
  });

  clause('a key acquired after its completed record expired is a new record: created now, with the new fingerprint', async () => {
    const key = ctx.key('ttl-new-record');
    const token = await acquire(store(), key, LONG_MS, 'fp-old');
    expect(await store().complete(key, token, textResponse('old'), SHORT_MS)).toBe(true);
    const old = await mustGet(store(), key);
    await waitForExpiry(store(), ctx);
    const before = Date.now();
    expect((await store().begin(key, 'fp-new', LONG_MS)).kind).toBe('acquired');
    const record = await mustGet(store(), key);
    expect(record.createdAt).toBeGreaterThan(old.createdAt);
    expectNear(record.createdAt, before);
    expect(record.fingerprint).toBe('fp-new');
  });

  // A job key reused on a short TTL (a dedupe window): every round after an expiry is a fresh
  // claim. A store that remembered something of the first takeover must not block the next.
  clause('a key whose completed record expires three times in a row is acquired each time, with its own answer', async () => {
    const key = ctx.key('ttl-again');
    for (let round = 1; round <= 3; round++) {
      const next = await store().begin(key, 'fp', LONG_MS);
      expect(next.kind, `round ${round}`).toBe('acquired');
      if (next.kind !== 'acquired') return;
      expect(await store().complete(key, next.token, textResponse(`round ${round}`), SHORT_MS)).toBe(true);
      expectSameResponse((await mustGet(store(), key)).response, textResponse(`round ${round}`));
      const completedAt = performance.now();
      await waitUntilGone(store(), key);
      // Gone when the TTL ends, not a grace period later.
      expect(performance.now() - completedAt, `round ${round}: gone ms after completion`).toBeLessThan(SHORT_MS + PROMPT_MS);
    }
  });

  clause('the TTL counts from completion, not from begin', async () => {
    const key = ctx.key('ttl-not-from-begin');
    const token = await acquire(store(), key, LONG_MS);
    const begun = Date.now();
    // Let some time pass between begin and complete (a handler at work), by the store's clock.
    const canary = ctx.key('ttl-begin-canary');
    await acquire(store(), canary, SHORT_MS);
    await waitUntilGone(store(), canary);
    const record = await mustGet(store(), key);
    const completing = Date.now();
    expect(await store().complete(key, token, textResponse('late answer'), LONG_MS)).toBe(true);
    const done = await mustGet(store(), key);
    expect(done.createdAt).toBe(record.createdAt);
    // Both ends by the store's own clock: at least the handler's time plus the TTL apart.
    expect(done.expiresAt - done.createdAt).toBeGreaterThanOrEqual(LONG_MS + (completing - begun) - 5);
  });

  clause('the TTL counts from completion and replaces the lease end', async () => {
    const key = ctx.key('ttl-from-complete');
    const token = await acquire(store(), key, SHORT_MS);
    const response = textResponse('kept');
    expect(await store().complete(key, token, response, LONG_MS)).toBe(true);
    // Once a canary begun after the completion with the same short lease is gone, the original
    // lease end has passed; the completed record must still be there.
    const canary = ctx.key('ttl-canary');
    await acquire(store(), canary, SHORT_MS);
    await waitUntilGone(store(), canary);

    const record = await mustGet(store(), key);
    expect(record.state).toBe('completed');
    expectSameResponse(record.response, response);
  });
}
