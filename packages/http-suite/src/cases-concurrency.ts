import { expect, vi } from 'vitest';
import { expectProblem, newKey, type CaseContext } from './context.js';

const PARALLEL = 100;
/** Long enough for 100 requests to reach a loaded CI machine; a pass never waits for it. */
const ARRIVAL_TIMEOUT_MS = 15_000;

/** SPEC §2 row: same key while the first is still running. */
export function concurrencyCases(t: CaseContext): void {
  t.test(`${PARALLEL} parallel requests, one key → handler once, the others 409 + Retry-After`, async () => {
    const app = await t.app();
    const key = newKey();
    let answered = 0;
    const sent = Array.from({ length: PARALLEL }, () =>
      app.post('/orders?hold=first', { key, json: { sku: 'A-1' } }).finally(() => answered++),
    );
    // The handler holds its lease until every request is answered or in a handler itself: a
    // second handler run would hold too, so it cannot slip past the count below.
    await vi.waitFor(() => expect(answered + app.count('orders')).toBe(PARALLEL), { timeout: ARRIVAL_TIMEOUT_MS, interval: 5 });
    app.open('first');
    const replies = await Promise.all(sent);
    expect(app.count('orders')).toBe(1);
    const winners = replies.filter((r) => r.status === 201);
    expect(winners).toHaveLength(1);
    expect(winners[0]?.replayed).toBe(false);
    const conflicts = replies.filter((r) => r.status !== 201);
    expect(conflicts).toHaveLength(PARALLEL - 1);
    for (const reply of conflicts) {
      const problem = expectProblem(reply, 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
      const retryAfter = Number(reply.headers.get('retry-after'));
      expect(Number.isInteger(retryAfter)).toBe(true);
      expect(retryAfter).toBeGreaterThanOrEqual(1);
      expect(problem['retryAfter']).toBe(retryAfter);
    }
    // Once the winner is done, the key replays.
    const after = await app.post('/orders?hold=first', { key, json: { sku: 'A-1' } });
    expect(after.replayed).toBe(true);
    expect(after.body).toEqual(winners[0]?.body);
  }, 30_000);

  t.test(`${PARALLEL} parallel requests, one key, concurrency: 'wait' → handler once, all get the identical response`, async () => {
    const app = await t.app({ concurrency: 'wait', waitTimeoutMs: 15_000 });
    const key = newKey();
    let answered = 0;
    const sent = Array.from({ length: PARALLEL }, () =>
      app.post('/orders?hold=first', { key, json: { sku: 'A-1' } }).finally(() => answered++),
    );
    // Every duplicate reaches the server while the handler holds the lease; none is answered
    // before it lets go (they wait instead of getting a 409).
    await vi.waitFor(
      () => {
        expect(app.count('orders:arrived')).toBe(PARALLEL);
        expect(app.count('orders')).toBeGreaterThanOrEqual(1);
      },
      { timeout: ARRIVAL_TIMEOUT_MS, interval: 5 },
    );
    expect(answered).toBe(0);
    app.open('first');
    const replies = await Promise.all(sent);
    expect(app.count('orders')).toBe(1);
    for (const reply of replies) expect(reply.status).toBe(201);
    const original = replies.filter((r) => !r.replayed);
    expect(original).toHaveLength(1);
    const bytes = original[0]?.body;
    for (const reply of replies) expect(reply.body).toEqual(bytes);
  }, 30_000);

  t.test("concurrency: 'wait' past waitTimeoutMs → 409 + Retry-After, the handler still runs once", async () => {
    const app = await t.app({ concurrency: 'wait', waitTimeoutMs: 300 });
    const key = newKey();
    const first = app.post('/orders?hold=first', { key, json: { sku: 'A-1' } });
    await vi.waitFor(() => expect(app.count('orders')).toBe(1), { timeout: ARRIVAL_TIMEOUT_MS, interval: 5 });
    // The first holds its lease until the gate opens, which is only after this answer: the wait must give up.
    const waited = await app.post('/orders?hold=first', { key, json: { sku: 'A-1' } });
    app.open('first');
    expect((await first).status).toBe(201);
    const problem = expectProblem(waited, 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    const retryAfter = Number(waited.headers.get('retry-after'));
    expect(Number.isInteger(retryAfter)).toBe(true);
    expect(retryAfter).toBeGreaterThanOrEqual(1);
    expect(problem['retryAfter']).toBe(retryAfter);
    expect(app.count('orders')).toBe(1);
  });

  t.test('a different request under a key that is still running → 422 (not 409); the same request → 409, Retry-After from the default 60 s lease', async () => {
    const app = await t.app();
    const key = newKey();
    const first = app.post('/orders?hold=first', { key, json: { sku: 'A-1' } });
    await vi.waitFor(() => expect(app.count('orders')).toBe(1), { timeout: ARRIVAL_TIMEOUT_MS, interval: 5 });
    const other = await app.post('/orders?hold=first', { key, json: { sku: 'B-2' } });
    const same = await app.post('/orders?hold=first', { key, json: { sku: 'A-1' } });
    app.open('first');
    const original = await first;
    expect(original.status).toBe(201);
    expectProblem(other, 422, 'ERR_IDEMKIT_FINGERPRINT_MISMATCH');
    expectProblem(same, 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    // SPEC §2: the seconds left on the lease; the lease is 60 s by default and just began.
    const retryAfter = Number(same.headers.get('retry-after'));
    expect(retryAfter).toBeLessThanOrEqual(60);
    expect(retryAfter).toBeGreaterThanOrEqual(50);
    expect(app.count('orders')).toBe(1);
    // The refused request changed nothing: the original replays.
    const replay = await app.post('/orders?hold=first', { key, json: { sku: 'A-1' } });
    expect(replay.replayed).toBe(true);
    expect(replay.body).toEqual(original.body);
  });

  t.test('a client that hangs up mid-handler: the handler finishes once, the retry gets its stored answer', async () => {
    const app = await t.app();
    const key = newKey();
    const controller = new AbortController();
    const gone = fetch(`${app.url}/orders?delay=600`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'idempotency-key': key },
      body: JSON.stringify({ sku: 'A-1' }),
      signal: controller.signal,
    }).catch((error: unknown) => error);
    // Hang up once the handler is running (observable), not after a guessed delay.
    await vi.waitFor(() => expect(app.count('orders')).toBe(1), { timeout: 10_000, interval: 10 });
    controller.abort();
    await gone;
    // Retries see 409 while the handler still runs, then its stored answer; it never runs twice.
    await vi.waitFor(
      async () => {
        const retry = await app.post('/orders?delay=600', { key, json: { sku: 'A-1' } });
        expect(retry.status).toBe(201);
        expect(retry.replayed).toBe(true);
      },
      { timeout: 10_000, interval: 100 },
    );
    expect(app.count('orders')).toBe(1);
  });
}
