import { defaultFingerprint, type IdempotencyEvent, type LeaseToken } from '@idemkit/core';
import { expect, vi } from 'vitest';
import { expectProblem, newKey, storeId, type CaseContext } from './context.js';

/** SPEC §2 rows: scopes, TTL expiry, takeover of a crashed holder's lease. */
export function lifecycleCases(t: CaseContext): void {
  t.test('scope isolation: the same key from two users runs twice, each replays its own', async () => {
    const app = await t.app();
    const key = newKey();
    const a1 = await app.post('/orders', { key, user: 'a', json: { sku: 'A-1' } });
    const b1 = await app.post('/orders', { key, user: 'b', json: { sku: 'A-1' } });
    expect(a1.replayed).toBe(false);
    expect(b1.replayed).toBe(false);
    expect(app.count('orders')).toBe(2);
    const a2 = await app.post('/orders', { key, user: 'a', json: { sku: 'A-1' } });
    const b2 = await app.post('/orders', { key, user: 'b', json: { sku: 'A-1' } });
    expect(a2.replayed).toBe(true);
    expect(b2.replayed).toBe(true);
    expect(a2.body).toEqual(a1.body);
    expect(b2.body).toEqual(b1.body);
    expect(a1.body).not.toEqual(b1.body);
    expect(app.count('orders')).toBe(2);
  });

  t.test('defaults reach the store: a 60 s lease while the handler runs, a 24 h TTL once completed', async () => {
    const app = await t.app();
    const key = newKey();
    const first = app.post('/orders?hold=first', { key, json: { sku: 'A-1' } });
    await vi.waitFor(() => expect(app.count('orders')).toBe(1), { timeout: 10_000, interval: 5 });
    // Store times are by the store's clock; the services run beside this process, so a few seconds cover it.
    const running = await t.harness().store.get(storeId(key));
    expect(running?.state).toBe('in_progress');
    expect(Math.abs((running?.leaseExpiresAt ?? 0) - Date.now() - 60_000)).toBeLessThan(5_000);
    app.open('first');
    expect((await first).status).toBe(201);
    const done = await t.harness().store.get(storeId(key));
    expect(done?.state).toBe('completed');
    expect(Math.abs((done?.expiresAt ?? 0) - Date.now() - 86_400_000)).toBeLessThan(5_000);
  });

  t.test('expired TTL → the key is treated as new', async () => {
    const app = await t.app({ ttlMs: 300 });
    const key = newKey();
    const first = await app.post('/orders', { key });
    expect(first.status).toBe(201);
    // Observable condition, not a sleep: the store itself says the record is gone.
    await vi.waitFor(async () => expect(await t.harness().store.get(storeId(key))).toBeUndefined(), { timeout: 10_000, interval: 50 });
    const again = await app.post('/orders', { key });
    expect(again.status).toBe(201);
    expect(again.replayed).toBe(false);
    expect(app.count('orders')).toBe(2);
  });

  t.test('expired lease of a crashed holder → the next request takes over; the late completion is refused', async () => {
    const events: IdempotencyEvent[] = [];
    const app = await t.app({ onEvent: (e) => events.push(e) });
    const { store } = t.harness();
    const key = newKey();
    const body = { sku: 'A-1' };
    // A "crashed" holder: it took the key (with the fingerprint the binding will compute) and never came back.
    const fingerprint = defaultFingerprint({ method: 'POST', path: '/orders', body });
    // 2 s: the app's first request below must still meet this lease, on a slow store too.
    const crashed = await store.begin(storeId(key), fingerprint, 2_000);
    expect(crashed.kind).toBe('acquired');
    const token = (crashed as { token: LeaseToken }).token;

    expectProblem(await app.post('/orders', { key, json: body }), 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    expect(app.count('orders')).toBe(0);

    await vi.waitFor(async () => expect(await store.get(storeId(key))).toBeUndefined(), { timeout: 10_000, interval: 50 });
    const takeover = await app.post('/orders', { key, json: body });
    expect(takeover.status).toBe(201);
    expect(takeover.replayed).toBe(false);
    expect(app.count('orders')).toBe(1);
    expect(events).toContainEqual({ type: 'executed', key, tookOver: true });

    // The old holder finishes late: refused, nothing overwritten.
    const late = await store.complete(storeId(key), token, { status: 200, headers: [], body: new Uint8Array([1]) }, 60_000);
    expect(late).toBe(false);
    const replay = await app.post('/orders', { key, json: body });
    expect(replay.replayed).toBe(true);
    expect(replay.body).toEqual(takeover.body);
  });
}
