import { expect } from 'vitest';
import { LONG_MS, acquire, clause, expectNear, mustGet, snapshot, textResponse, useStore, type SuiteContext } from './context.js';

/** SPEC §3 begin: claim a new key, or report the live record. */
export function beginSuite(ctx: SuiteContext): void {
  const store = useStore(ctx);

  clause('begin on a new key acquires a fresh lease token (tookOver false)', async () => {
    const result = await store().begin(ctx.key('begin-new'), 'fp-1', LONG_MS);
    expect(result.kind).toBe('acquired');
    if (result.kind !== 'acquired') return;
    expect(typeof result.token).toBe('string');
    expect(result.token.length).toBeGreaterThan(0);
    expect(result.tookOver).toBe(false);
  });

  clause('get() shows the new record in progress, with fingerprint, lease end and no response', async () => {
    const key = ctx.key('begin-get');
    const before = Date.now();
    await store().begin(key, 'sha256:abc', LONG_MS);
    const after = Date.now();
    const record = await mustGet(store(), key);
    expect(record.key).toBe(key);
    expect(record.state).toBe('in_progress');
    expect(record.fingerprint).toBe('sha256:abc');
    expect(record.response).toBeNull();
    expect(record.leaseExpiresAt).not.toBeNull();
    // Lease end ≈ now + lease, by the store's clock (tolerates modest clock skew).
    expectNear(record.leaseExpiresAt ?? 0, before + LONG_MS);
    expectNear(record.leaseExpiresAt ?? 0, after + LONG_MS);
    expect(record.leaseExpiresAt ?? 0).toBeGreaterThan(Date.now());
    expectNear(record.createdAt, before);
    // An in-progress record lives exactly as long as its lease.
    expect(Math.abs(record.expiresAt - (record.leaseExpiresAt ?? 0))).toBeLessThanOrEqual(1);
  });

  clause('a null fingerprint is stored as null', async () => {
    const key = ctx.key('begin-null-fp');
    await store().begin(key, null, LONG_MS);
    const record = await mustGet(store(), key);
    expect(record.fingerprint).toBeNull();
    const again = await store().begin(key, null, LONG_MS);
    expect(again.kind).toBe('existing');
    if (again.kind === 'existing') expect(again.record.fingerprint).toBeNull();
  });

  clause('fingerprints are kept exactly, in progress and completed: empty (not null), spaces, colons, non-ASCII', async () => {
    // A custom `fingerprint(request)` may return any string; the engine compares it as given, and
    // treats null as "fingerprinting off", so '' must not come back as null (nor the other way).
    const fingerprints = ['', ' ', ' padded ', 'a:b:c', '::', 'é-e\u0301-ключ-🔑', '"quoted"', 'null'];
    await Promise.all(
      fingerprints.map(async (fingerprint) => {
        const key = ctx.key('begin-fp-exact');
        const token = await acquire(store(), key, LONG_MS, fingerprint);
        const label = JSON.stringify(fingerprint);
        expect((await mustGet(store(), key)).fingerprint, `in progress: ${label}`).toBe(fingerprint);
        const running = await store().begin(key, 'other', LONG_MS);
        expect(running.kind === 'existing' && running.record.fingerprint, `begin, in progress: ${label}`).toBe(fingerprint);
        expect(await store().complete(key, token, textResponse('done'), LONG_MS)).toBe(true);
        expect((await mustGet(store(), key)).fingerprint, `completed: ${label}`).toBe(fingerprint);
        const replay = await store().begin(key, 'other', LONG_MS);
        expect(replay.kind === 'existing' && replay.record.fingerprint, `begin, completed: ${label}`).toBe(fingerprint);
      }),
    );
  });

  clause('begin again returns the live record and the lease time left (0 < left <= lease)', async () => {
    const key = ctx.key('begin-again');
    await store().begin(key, 'fp-first', LONG_MS);
    const stored = await mustGet(store(), key);
    // A different fingerprint does not overwrite the record: the engine compares, the store keeps.
    const again = await store().begin(key, 'fp-second', LONG_MS);
    expect(again.kind).toBe('existing');
    if (again.kind !== 'existing') return;
    expect(again.record.key).toBe(key);
    expect(again.record.state).toBe('in_progress');
    expect(again.record.fingerprint).toBe('fp-first');
    expect(again.record.response).toBeNull();
    expect(again.record.leaseExpiresAt).toBe(stored.leaseExpiresAt);
    expect(again.record.createdAt).toBe(stored.createdAt);
    expect(again.leaseRemainingMs).toBeGreaterThan(0);
    expect(again.leaseRemainingMs).toBeLessThanOrEqual(LONG_MS);
    expect(again.leaseRemainingMs).toBeGreaterThan(LONG_MS - 60_000);
    expect((await mustGet(store(), key)).fingerprint).toBe('fp-first');
    // The time left on the lease that is there, not the lease this caller asked for (it feeds
    // Retry-After): a longer request changes nothing.
    const longer = await store().begin(key, 'fp-third', 3 * LONG_MS);
    expect(longer.kind === 'existing' && longer.leaseRemainingMs).toBeLessThanOrEqual(LONG_MS);
    expect((await mustGet(store(), key)).leaseExpiresAt).toBe(stored.leaseExpiresAt);
  });

  // A replaying begin that wrote the caller's fingerprint over the first one (found by mutation
  // testing the suite): the next retry with the first body would get 422 for its own request.
  clause('a begin that finds the record changes nothing, in progress or completed: not its fingerprint, not its lease or TTL', async () => {
    const key = ctx.key('begin-read-only');
    const token = await acquire(store(), key, LONG_MS, 'fp-first');
    const running = snapshot(await store().get(key));
    expect((await store().begin(key, 'fp-other', 3 * LONG_MS)).kind).toBe('existing');
    expect(snapshot(await store().get(key))).toEqual(running);
    expect(await store().complete(key, token, textResponse('done'), LONG_MS)).toBe(true);
    const done = snapshot(await store().get(key));
    for (let i = 0; i < 2; i++) {
      const replay = await store().begin(key, 'fp-other', 3 * LONG_MS);
      expect(replay.kind === 'existing' && replay.record.fingerprint).toBe('fp-first');
      expect(snapshot(await store().get(key))).toEqual(done);
    }
  });

  clause('get() on an unknown key is undefined', async () => {
    expect(await store().get(ctx.key('begin-unknown'))).toBeUndefined();
  });

  clause('every acquisition mints a different token', async () => {
    const results = await Promise.all(
      Array.from({ length: 20 }, () => store().begin(ctx.key('begin-tokens'), 'fp', LONG_MS)),
    );
    const tokens = results.map((r) => (r.kind === 'acquired' ? r.token : 'not acquired'));
    expect(tokens).not.toContain('not acquired');
    expect(new Set(tokens).size).toBe(tokens.length);
  });
}
