import { describe, expect, it, vi } from 'vitest';
import {
  createIdempotencyEngine,
  createMemoryStore,
  FingerprintMismatchError,
  KeyError,
  MemoryStore,
  problemType,
  RequestInProgressError,
  StoreUnavailableError,
  type BeginResult,
  type Decision,
  type IdempotencyEvent,
  type IdempotencyStore,
  type Lease,
  type StoredResponse,
} from '../src/index.js';
import { enc, request, response, setup } from './helpers.js';

/** The store's begin lands at once but answers `ms` late (until `onTime()`): a slow network or pool. */
function answeringLate(store: IdempotencyStore, ms: number): { onTime(): void } {
  const begin = store.begin.bind(store);
  let late = true;
  store.begin = async (...args) => {
    const result = await begin(...args);
    if (late) await new Promise((r) => setTimeout(r, ms));
    return result;
  };
  return { onTime: () => void (late = false) };
}

function expectRun(d: Decision): Lease {
  expect(d.kind).toBe('run');
  if (d.kind !== 'run') throw new Error('not run');
  return d.lease;
}

function expectProblem(d: Decision, status: number, code: string) {
  expect(d.kind).toBe('problem');
  if (d.kind !== 'problem') throw new Error('not a problem');
  expect(d.error.status).toBe(status);
  expect(d.error.code).toBe(code);
  return d.error;
}

describe('SPEC §2 through the engine', () => {
  it('passes methods that are not covered (default POST, PATCH)', async () => {
    const { engine } = setup();
    expect(await engine.decide(request({ method: 'GET', key: 'k' }))).toEqual({ kind: 'pass' });
    expect(await engine.decide(request({ method: 'DELETE' }))).toEqual({ kind: 'pass' });
    expectRun(await engine.decide(request({ method: 'patch', key: 'k-patch' })));
  });

  it('answers 400 when the key is missing and required (default)', async () => {
    const { engine } = setup();
    const error = expectProblem(await engine.decide(request({ body: { item: 'x' } })), 400, 'ERR_IDEMKIT_KEY_MISSING');
    expect(error).toBeInstanceOf(KeyError);
    expect(error.toProblem()).toMatchObject({ type: problemType('ERR_IDEMKIT_KEY_MISSING'), status: 400, title: 'Idempotency key missing' });
    // Every place a key may come from: a client that sends it in the body is not misled.
    expect(error.message).toBe('This request needs an Idempotency-Key header (or an `idempotencyKey` field in its JSON body).');
  });

  it('passes keyless requests with required: false', async () => {
    const { engine } = setup({ required: false });
    expect(await engine.decide(request())).toEqual({ kind: 'pass' });
  });

  it.each([
    ['empty', ''],
    ['256 chars', 'a'.repeat(256)],
    ['control character', 'ab\u0001c'],
    ['non-ASCII', 'clé'],
    ['broken sf-string', '"unterminated'],
  ])('answers 400 for an invalid key (%s)', async (_, key) => {
    const { engine, store } = setup();
    expectProblem(await engine.decide(request({ key })), 400, 'ERR_IDEMKIT_KEY_INVALID');
    expect(store.size).toBe(0);
  });

  it('accepts 255 chars and answers 400 for several key headers', async () => {
    const { engine } = setup();
    expectRun(await engine.decide(request({ key: 'a'.repeat(255) })));
    const error = expectProblem(await engine.decide(request({ key: ['a', 'b'] })), 400, 'ERR_IDEMKIT_KEY_INVALID');
    expect(error.message).toContain('exactly one');
  });

  it('applies a custom validator (false or a reason)', async () => {
    const { engine } = setup({ validateKey: (k) => (k.startsWith('ord_') ? true : k === 'x' ? false : 'must start with ord_') });
    expectRun(await engine.decide(request({ key: 'ord_1' })));
    expect(expectProblem(await engine.decide(request({ key: 'nope' })), 400, 'ERR_IDEMKIT_KEY_INVALID').message).toBe('must start with ord_');
    expectProblem(await engine.decide(request({ key: 'x' })), 400, 'ERR_IDEMKIT_KEY_INVALID');
  });

  it('an async validateKey is a server error that says so, not a 400 for every key', async () => {
    const asyncRule = (async (k: string) => k.startsWith('ord_')) as unknown as (k: string) => boolean;
    const { engine } = setup({ validateKey: asyncRule });
    await expect(engine.decide(request({ key: 'ord_1' }))).rejects.toThrow('`validateKey` returned a Promise; it must return true, false or a reason synchronously. Check keys asynchronously in `getKey` instead.');
    // An empty reason would make an empty 400: the default text instead.
    const { engine: blank } = setup({ validateKey: () => '' });
    expect(expectProblem(await blank.decide(request({ key: 'k' })), 400, 'ERR_IDEMKIT_KEY_INVALID').message).toBe('The key was rejected by the server’s key rules.');
  });

  it('runs the first request, then replays the stored response byte for byte', async () => {
    const { engine, events } = setup();
    const lease = expectRun(await engine.decide(request({ key: 'k1' })));
    expect(lease.context).toEqual({ key: 'k1', tookOver: false, transaction: undefined });
    const original = response(201, '{"id":"o_1"}');
    expect(await lease.commit(original)).toBe(true);
    expect(lease.settled).toBe(true);

    const again = await engine.decide(request({ key: 'k1' }));
    expect(again.kind).toBe('replay');
    if (again.kind !== 'replay') return;
    expect(again.response.status).toBe(201);
    expect(again.response.headers).toEqual(original.headers);
    expect(Buffer.from(again.response.body).equals(Buffer.from(original.body))).toBe(true);
    expect(events.map((e) => e.type)).toEqual(['executed', 'completed', 'replayed']);
  });

  it('settles a lease exactly once', async () => {
    const { engine, store } = setup();
    const lease = expectRun(await engine.decide(request({ key: 'once' })));
    expect(await lease.commit(response())).toBe(true);
    expect(await lease.commit(response(200, 'other'))).toBe(false);
    await lease.abandon('handler-threw');
    await lease.commitUnbuffered(200, 'not-bufferable');
    expect((await store.get('-:once'))?.response?.status).toBe(201);
  });

  it('treats the sf-string form and the bare form as one key', async () => {
    const { engine } = setup();
    const lease = expectRun(await engine.decide(request({ key: '"abc"' })));
    expect(lease.key).toBe('abc');
    await lease.commit(response());
    expect((await engine.decide(request({ key: 'abc' }))).kind).toBe('replay');
    expect((await engine.decide(request({ key: '"abc";p=1' }))).kind).toBe('replay');
  });

  it('reads the key from the body field when no header is sent', async () => {
    const { engine } = setup();
    const body = { idempotencyKey: 'from-body', data: { a: 1 } };
    const lease = expectRun(await engine.decide(request({ path: '/create', body })));
    expect(lease.key).toBe('from-body');
    await lease.commit(response());
    expect((await engine.decide(request({ path: '/create', body }))).kind).toBe('replay');
    expectProblem(await engine.decide(request({ body: { idempotencyKey: 42 } })), 400, 'ERR_IDEMKIT_KEY_INVALID');
  });

  it('uses a custom getKey and ignores the body field when bodyField is false', async () => {
    const { engine } = setup({ getKey: (req) => (req.path === '/a' ? 'custom' : undefined) });
    expect(expectRun(await engine.decide(request({ path: '/a' }))).key).toBe('custom');
    expect(expectProblem(await engine.decide(request({ path: '/b' })), 400, 'ERR_IDEMKIT_KEY_MISSING').message).toBe('This request needs an idempotency key.');
    const noBody = setup({ bodyField: false });
    const error = expectProblem(await noBody.engine.decide(request({ body: { idempotencyKey: 'x' } })), 400, 'ERR_IDEMKIT_KEY_MISSING');
    expect(error.message).toBe('This request needs an Idempotency-Key header.');
  });

  it('answers 422 for the same key with a different request and leaves the record untouched', async () => {
    const { engine, events } = setup();
    const lease = expectRun(await engine.decide(request({ key: 'k2' })));
    await lease.commit(response(201, 'first'));
    const other = await engine.decide(request({ key: 'k2', body: { item: 'car', amount: 1 } }));
    expect(expectProblem(other, 422, 'ERR_IDEMKIT_FINGERPRINT_MISMATCH')).toBeInstanceOf(FingerprintMismatchError);
    expectProblem(await engine.decide(request({ key: 'k2', path: '/refunds' })), 422, 'ERR_IDEMKIT_FINGERPRINT_MISMATCH');
    const replay = await engine.decide(request({ key: 'k2' }));
    expect(replay.kind === 'replay' && Buffer.from(replay.response.body).toString()).toBe('first');
    expect(events.filter((e) => e.type === 'mismatch')).toHaveLength(2);
  });

  it('ignores body key order in the fingerprint, and skips the check with fingerprint: false', async () => {
    const { engine } = setup();
    await expectRun(await engine.decide(request({ key: 'k3', body: { a: 1, b: [1, { c: 2, d: 3 }] } }))).commit(response());
    expect((await engine.decide(request({ key: 'k3', body: { b: [1, { d: 3, c: 2 }], a: 1 } }))).kind).toBe('replay');

    const loose = setup({ fingerprint: false });
    await expectRun(await loose.engine.decide(request({ key: 'k' }))).commit(response());
    expect((await loose.engine.decide(request({ key: 'k', body: 'other' }))).kind).toBe('replay');

    const custom = setup({ fingerprint: (req) => req.method });
    await expectRun(await custom.engine.decide(request({ key: 'k' }))).commit(response());
    expect((await custom.engine.decide(request({ key: 'k', path: '/elsewhere' }))).kind).toBe('replay');
  });

  it('answers 409 with Retry-After while the first request runs', async () => {
    const { engine, events } = setup({ leaseMs: 30_000 });
    const lease = expectRun(await engine.decide(request({ key: 'k4' })));
    const error = expectProblem(await engine.decide(request({ key: 'k4' })), 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    expect(error).toBeInstanceOf(RequestInProgressError);
    expect(Number(error.headers['retry-after'])).toBeGreaterThanOrEqual(29);
    expect(Number(error.headers['retry-after'])).toBeLessThanOrEqual(30);
    expect(events.find((e) => e.type === 'conflict')).toMatchObject({ key: 'k4' });
    await lease.abandon('client-gone');
  });

  it('Retry-After is at least 1 second', async () => {
    const { engine } = setup({ leaseMs: 200 });
    const lease = expectRun(await engine.decide(request({ key: 'short' })));
    expect(expectProblem(await engine.decide(request({ key: 'short' })), 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS').headers['retry-after']).toBe('1');
    await lease.abandon('client-gone');
  });

  it("with concurrency: 'wait', waits for the first to finish and replays it", async () => {
    const { engine } = setup({ concurrency: 'wait' });
    const lease = expectRun(await engine.decide(request({ key: 'k5' })));
    const waiting = Array.from({ length: 20 }, () => engine.decide(request({ key: 'k5' })));
    await lease.commit(response(201, 'done'));
    const results = await Promise.all(waiting);
    for (const r of results) expect(r.kind === 'replay' && Buffer.from(r.response.body).toString()).toBe('done');
  });

  it("with concurrency: 'wait', answers 409 when the wait times out", async () => {
    const { engine } = setup({ concurrency: 'wait', waitTimeoutMs: 150 });
    const lease = expectRun(await engine.decide(request({ key: 'k6' })));
    const started = Date.now();
    expectProblem(await engine.decide(request({ key: 'k6' })), 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    expect(Date.now() - started).toBeLessThan(2_000);
    await lease.abandon('client-gone');
  });

  it("with concurrency: 'wait', looks once more at the deadline instead of giving up a backoff step early", async () => {
    // Backoff 25, 50, 100 ms, then 200 would cross 300: the wait used to end at ~175 ms.
    const { engine, store } = setup({ concurrency: 'wait', waitTimeoutMs: 300 });
    const lease = expectRun(await engine.decide(request({ key: 'k6b' })));
    const begins: number[] = [];
    const begin = store.begin.bind(store);
    const started = performance.now();
    store.begin = (...args) => {
      begins.push(performance.now() - started);
      return begin(...args);
    };
    expectProblem(await engine.decide(request({ key: 'k6b' })), 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    expect(begins.at(-1)).toBeGreaterThanOrEqual(290);
    await lease.abandon('client-gone');
  });

  it.each([500, 502, 408, 409, 425, 429])('releases the key when the status %i is not storable', async (status) => {
    const { engine, events } = setup();
    const lease = expectRun(await engine.decide(request({ key: 'k7' })));
    expect(await lease.commit(response(status))).toBe(false);
    expect(events.at(-1)).toMatchObject({ type: 'released', reason: 'not-storable' });
    expectRun(await engine.decide(request({ key: 'k7' })));
  });

  it.each([400, 404, 422, 201, 302])('stores the storable status %i', async (status) => {
    const { engine } = setup();
    expect(await expectRun(await engine.decide(request({ key: 'k8' }))).commit(response(status))).toBe(true);
    expect((await engine.decide(request({ key: 'k8' }))).kind).toBe('replay');
  });

  it('honours a custom storable predicate', async () => {
    const { engine } = setup({ storable: (s) => s === 201 });
    expect(await expectRun(await engine.decide(request({ key: 'a' }))).commit(response(200))).toBe(false);
    expect(await expectRun(await engine.decide(request({ key: 'a' }))).commit(response(201))).toBe(true);
  });

  it('releases the key when the handler throws, so a retry runs again', async () => {
    const { engine, events } = setup();
    const lease = expectRun(await engine.decide(request({ key: 'k9' })));
    await lease.abandon('handler-threw');
    expect(events.at(-1)).toMatchObject({ type: 'released', reason: 'handler-threw' });
    expectRun(await engine.decide(request({ key: 'k9' })));
  });

  it('never re-runs a handler whose response could not be stored (stream / too large)', async () => {
    const { engine } = setup({ maxBodyBytes: 10 });
    const streamed = expectRun(await engine.decide(request({ key: 'stream' })));
    await streamed.commitUnbuffered(200, 'not-bufferable');
    const retry = await engine.decide(request({ key: 'stream' }));
    expect(retry.kind).toBe('replay');
    if (retry.kind !== 'replay') return;
    expect(retry.response.status).toBe(410);
    expect(JSON.parse(Buffer.from(retry.response.body).toString())).toMatchObject({
      type: problemType('ERR_IDEMKIT_RESPONSE_NOT_REPLAYABLE'),
      originalStatus: 200,
      reason: 'not-bufferable',
    });

    const big = expectRun(await engine.decide(request({ key: 'big' })));
    expect(await big.commit(response(201, 'x'.repeat(11)))).toBe(false);
    const bigRetry = await engine.decide(request({ key: 'big' }));
    expect(bigRetry.kind === 'replay' && JSON.parse(Buffer.from(bigRetry.response.body).toString()).reason).toBe('too-large');

    // A stream that failed (5xx) is released instead: nothing was delivered that a retry would repeat.
    const failed = expectRun(await engine.decide(request({ key: 'failed-stream' })));
    await failed.commitUnbuffered(500, 'not-bufferable');
    expectRun(await engine.decide(request({ key: 'failed-stream' })));
  });

  it("an answer whose body fits maxBodyBytes but whose body and headers exceed the store's maxResponseBytes gets the too-large marker, not a completion the store cannot keep", async () => {
    // As MongoDB's store: one record of 16 MiB at most, headers included.
    const store = Object.assign(createMemoryStore(), { maxResponseBytes: 100 });
    const complete = vi.spyOn(store, 'complete');
    const engine = createIdempotencyEngine({ store, logger: false, maxBodyBytes: 100 });
    const run = expectRun(await engine.decide(request({ key: 'big-headers' })));
    const answer = { status: 201, headers: [['x-trace', 'é'.repeat(20)]] as Array<[string, string]>, body: enc.encode('x'.repeat(60)) };
    expect(await run.commit(answer)).toBe(false);
    // Only the marker was written: the answer itself never reached the store.
    expect(complete).toHaveBeenCalledTimes(1);
    expect(complete.mock.calls[0]?.[2].status).toBe(410);
    const retry = await engine.decide(request({ key: 'big-headers' }));
    expect(retry.kind).toBe('replay');
    if (retry.kind !== 'replay') return;
    expect(JSON.parse(Buffer.from(retry.response.body).toString())).toMatchObject({ reason: 'too-large', detail: expect.stringMatching(/body and headers were more than the store can keep in one record \(100 bytes\)/) });
    // Headers within the limit (60 + 7 + 20 chars of ASCII) are stored as usual.
    const fits = expectRun(await engine.decide(request({ key: 'fits' })));
    expect(await fits.commit({ ...answer, headers: [['x-trace', 'e'.repeat(20)]] })).toBe(true);
  });

  it('scopes keys: two tenants with the same key never see each other', async () => {
    const { engine } = setup({ scope: (req) => String(req.headers['x-user'] ?? '') || undefined });
    const a = { ...request({ key: 'same' }), headers: { 'idempotency-key': 'same', 'x-user': 'alice' } };
    const b = { ...request({ key: 'same' }), headers: { 'idempotency-key': 'same', 'x-user': 'bob' } };
    await expectRun(await engine.decide(a)).commit(response(201, 'alice'));
    const bob = expectRun(await engine.decide(b));
    await bob.commit(response(201, 'bob'));
    const replayA = await engine.decide(a);
    expect(replayA.kind === 'replay' && Buffer.from(replayA.response.body).toString()).toBe('alice');
  });

  it('rejects a scope that is neither text nor a number', async () => {
    const { engine } = setup({ scope: () => ({ id: 42 }) as unknown as string });
    await expect(engine.decide(request({ key: 'k' }))).rejects.toThrow(/scope/);
  });

  it('treats an expired completed record as new', async () => {
    let now = 1_000_000;
    const store = createMemoryStore({ now: () => now });
    const engine = createIdempotencyEngine({ store, ttlMs: 1_000, logger: false });
    await expectRun(await engine.decide(request({ key: 'ttl' }))).commit(response());
    now += 999;
    expect((await engine.decide(request({ key: 'ttl' }))).kind).toBe('replay');
    now += 1;
    expectRun(await engine.decide(request({ key: 'ttl' })));
  });

  it("takes over a crashed holder's expired lease and refuses its late completion", async () => {
    let now = 5_000_000;
    const store = createMemoryStore({ now: () => now });
    const events: string[] = [];
    const warn = vi.fn();
    const engine = createIdempotencyEngine({ store, leaseMs: 60_000, logger: { warn, error: vi.fn() }, onEvent: (e) => events.push(e.type) });
    const crashed = expectRun(await engine.decide(request({ key: 'crash' })));
    now += 60_000;
    const next = expectRun(await engine.decide(request({ key: 'crash' })));
    expect(next.tookOver).toBe(true);
    expect(events).toContain('lease-taken-over');
    expect(await next.commit(response(201, 'winner'))).toBe(true);
    expect(await crashed.commit(response(201, 'late'))).toBe(false);
    expect(events).toContain('lease-lost');
    expect(warn).toHaveBeenCalledWith(expect.stringContaining('was lost before complete'));
    const replay = await engine.decide(request({ key: 'crash' }));
    expect(replay.kind === 'replay' && Buffer.from(replay.response.body).toString()).toBe('winner');
  });

  it('renews the lease while a long handler runs', async () => {
    const { engine } = setup({ leaseMs: 300 });
    const lease = expectRun(await engine.decide(request({ key: 'long' })));
    // The handler runs for several lease lengths; without renewal the key would be taken over.
    await new Promise((r) => setTimeout(r, 1_300));
    expectProblem(await engine.decide(request({ key: 'long' })), 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    expect(await lease.commit(response())).toBe(true);
  });

  it('a refused renewal warns that the handler is still running and may be run again beside it', async () => {
    const store = createMemoryStore();
    store.renew = () => Promise.resolve(false); // the record is gone (a store restarted without persistence)
    const warn = vi.fn();
    const events: string[] = [];
    const engine = createIdempotencyEngine({ store, leaseMs: 300, logger: { warn, error: vi.fn() }, onEvent: (e) => void events.push(e.type) });
    const lease = expectRun(await engine.decide(request({ key: 'renew-refused' })));
    await vi.waitFor(() => expect(events).toContain('lease-lost'), { timeout: 2_000 });
    // Before: "was lost before renew ... the late result was refused", though no result existed yet.
    expect(warn).toHaveBeenCalledWith(expect.stringContaining('Lease for key "renew-refused" was lost while its handler was still running (a renewal was refused)'));
    expect(warn).not.toHaveBeenCalledWith(expect.stringContaining('late result was refused'));
    await lease.abandon('handler-threw');
  });

  it('renews every lease still running while others of the same engine settle in any order', async () => {
    const { engine } = setup({ leaseMs: 300 });
    const keys = ['a', 'b', 'c', 'd', 'e', 'f'];
    const leases = new Map<string, Lease>();
    for (const key of keys) leases.set(key, expectRun(await engine.decide(request({ key }))));
    // Settle the newest, a middle one and the oldest; twice for one of them (a no-op the second time).
    for (const key of ['f', 'c', 'a', 'c']) await leases.get(key)!.abandon('handler-threw');
    await new Promise((r) => setTimeout(r, 1_300)); // several lease lengths
    for (const key of ['b', 'd', 'e']) expectProblem(await engine.decide(request({ key })), 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    for (const key of ['a', 'c', 'f']) expect((await engine.decide(request({ key }))).kind).toBe('run');
    for (const key of ['b', 'd', 'e']) expect(await leases.get(key)!.commit(response())).toBe(true);
  });

  it('keeps renewing while a slow completion lands, so no duplicate takes over meanwhile', async () => {
    const { engine, store } = setup({ leaseMs: 300 });
    const complete = store.complete.bind(store);
    let release!: () => void;
    const slow = new Promise<void>((r) => (release = r));
    store.complete = async (...args) => {
      await slow; // the store takes longer than the whole lease to store the answer
      return complete(...args);
    };
    const lease = expectRun(await engine.decide(request({ key: 'slow-complete' })));
    const committing = lease.commit(response());
    await new Promise((r) => setTimeout(r, 1_300)); // several lease lengths pass during the completion
    expectProblem(await engine.decide(request({ key: 'slow-complete' })), 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    release();
    expect(await committing).toBe(true);
    expect((await engine.decide(request({ key: 'slow-complete' }))).kind).toBe('replay');
  });

  it('never has two renewals of one lease in flight', async () => {
    const { engine, store } = setup({ leaseMs: 300 });
    const renew = store.renew.bind(store);
    let inFlight = 0;
    let most = 0;
    let calls = 0;
    store.renew = async (...args) => {
      inFlight++;
      calls++;
      most = Math.max(most, inFlight);
      await new Promise((r) => setTimeout(r, 150)); // slower than the 100 ms renewal tick
      inFlight--;
      return renew(...args);
    };
    const lease = expectRun(await engine.decide(request({ key: 'renew-once' })));
    await vi.waitFor(() => expect(calls).toBeGreaterThanOrEqual(3), { timeout: 10_000 });
    await lease.abandon('handler-threw');
    expect(most).toBe(1);
  });

  it('a renewal that hangs for good does not cost the lease: the next one goes out when due', async () => {
    // A renewal sent on a connection that died (no socket timeout) never settles. Before, no other
    // renewal went out until it did, and the key was taken over after one lease (seen on Postgres
    // after a 1 s network blip).
    const store = createMemoryStore();
    const engine = createIdempotencyEngine({ store, logger: false, leaseMs: 300, storeTimeoutMs: 50 });
    const renew = store.renew.bind(store);
    let calls = 0;
    store.renew = (...args) => (calls++ === 0 ? new Promise<never>(() => undefined) : renew(...args));
    const lease = expectRun(await engine.decide(request({ key: 'stuck-renewal' })));
    const other = createIdempotencyEngine({ store, logger: false, leaseMs: 300 });
    for (let i = 0; i < 6; i++) {
      await new Promise((r) => setTimeout(r, 200)); // 1.2 s in all: four leases
      expectProblem(await other.decide(request({ key: 'stuck-renewal' })), 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    }
    expect(calls).toBeGreaterThanOrEqual(3);
    expect(await lease.commit(response())).toBe(true);
  });

  it('with two renewals stuck, sends no third until one settles', async () => {
    const store = createMemoryStore();
    const engine = createIdempotencyEngine({ store, logger: false, leaseMs: 300, storeTimeoutMs: 20 });
    let calls = 0;
    store.renew = () => {
      calls++;
      return new Promise<never>(() => undefined);
    };
    const lease = expectRun(await engine.decide(request({ key: 'all-stuck' })));
    await new Promise((r) => setTimeout(r, 900)); // nine renewal ticks, three renewals due
    expect(calls).toBe(2);
    await lease.abandon('handler-threw');
  });

  it('does not run the handler when begin answered only after the whole lease had passed', async () => {
    const { store, engine, events } = setup({ leaseMs: 200 });
    const answers = answeringLate(store, 300);
    // Before: 'run', with a lease another process could already have taken over.
    expectProblem(await engine.decide(request({ key: 'late-begin' })), 503, 'ERR_IDEMKIT_STORE_UNAVAILABLE');
    expect(events).toContainEqual(expect.objectContaining({ type: 'store-error', key: 'late-begin', operation: 'begin' }));
    expect(events.some((e) => e.type === 'executed')).toBe(false);
    answers.onTime();
    // The claim was given back: the retry runs at once instead of getting 409.
    await vi.waitFor(async () => expect((await store.get('-:late-begin'))).toBeUndefined(), { timeout: 2_000, interval: 10 });
    expect((await engine.decide(request({ key: 'late-begin' }))).kind).toBe('run');
  });

  it("onStoreError 'pass' with concurrency 'wait': a store failing while a duplicate waits answers 409, never a second run", async () => {
    const { store, engine, events } = setup({ leaseMs: 5_000, concurrency: 'wait', onStoreError: 'pass', waitTimeoutMs: 3_000 });
    const first = expectRun(await engine.decide(request({ key: 'pass-wait' })));
    const begin = store.begin.bind(store);
    let calls = 0;
    store.begin = (...args) => (calls++ === 0 ? begin(...args) : Promise.reject(new Error('store away')));
    // Before: 'pass', so the handler ran beside the first request for the same key.
    expectProblem(await engine.decide(request({ key: 'pass-wait' })), 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    expect(events).toContainEqual(expect.objectContaining({ type: 'store-error', operation: 'begin' }));
    // Without having seen it running, 'pass' still runs without idempotency.
    expect((await engine.decide(request({ key: 'other-key' }))).kind).toBe('pass');
    store.begin = begin;
    expect(await first.commit(response())).toBe(true);
  });

  it('logs a failing store once per 10 s with a count, not once per request', async () => {
    const error = vi.fn();
    const store = createMemoryStore();
    store.begin = () => Promise.reject(new Error('down'));
    const events: IdempotencyEvent[] = [];
    const engine = createIdempotencyEngine({ store, logger: { warn: () => undefined, error }, onEvent: (e) => events.push(e) });
    for (let i = 0; i < 50; i++) expectProblem(await engine.decide(request({ key: `k${i}` })), 503, 'ERR_IDEMKIT_STORE_UNAVAILABLE');
    // Before: 50 lines, each with a stack.
    expect(error).toHaveBeenCalledTimes(1);
    expect(error.mock.calls[0]?.[0]).toMatch(/Store begin failed for key "k0"; not logged again for 10 s/);
    expect(events.filter((e) => e.type === 'store-error')).toHaveLength(50);
  });

  it('once the store answers again (10 s after the last line), says how many failures were not logged', async () => {
    vi.useFakeTimers({ toFake: ['performance'] });
    try {
      const error = vi.fn();
      const warn = vi.fn();
      const store = createMemoryStore();
      const begin = store.begin.bind(store);
      let down = true;
      store.begin = (...args) => (down ? Promise.reject(new Error('down')) : begin(...args));
      const engine = createIdempotencyEngine({ store, logger: { warn, error }, onStoreError: 'pass' });
      for (let i = 0; i < 5; i++) expect((await engine.decide(request({ key: `pay-${i}` }))).kind).toBe('pass');
      expect(error).toHaveBeenCalledTimes(1);
      expect(error.mock.calls[0]?.[0]).toMatch(/onStoreError: 'pass': such requests run without idempotency/);
      down = false;
      expect((await engine.decide(request({ key: 'ok-1' }))).kind).toBe('run');
      expect(warn).not.toHaveBeenCalled(); // within the 10 s: not yet
      vi.advanceTimersByTime(10_000);
      expect((await engine.decide(request({ key: 'ok-2' }))).kind).toBe('run');
      // Before, the 4 failures after the first were never mentioned.
      expect(warn).toHaveBeenCalledTimes(1);
      expect(warn.mock.calls[0]?.[0]).toMatch(/The store answers again; 4 more store failures were not logged/);
    } finally {
      vi.useRealTimers();
    }
  });

  it("a begin slower than the lease with onStoreError 'pass' is still a 503: its claim was given back, so a run could be repeated", async () => {
    const error = vi.fn();
    const { store, engine } = setup({ leaseMs: 200, onStoreError: 'pass', logger: { warn: () => undefined, error } });
    const answers = answeringLate(store, 300);
    // Before this fix's fix: 'pass' (run without idempotency) after the key was freed, so the retry ran it again.
    expectProblem(await engine.decide(request({ key: 'late-pass' })), 503, 'ERR_IDEMKIT_STORE_UNAVAILABLE');
    // And its log line does not claim the request ran without idempotency.
    expect(error).toHaveBeenCalledTimes(1);
    expect(error.mock.calls[0]?.[0]).not.toMatch(/run without idempotency/);
    answers.onTime();
    await vi.waitFor(async () => expect(await store.get('-:late-pass')).toBeUndefined(), { timeout: 2_000, interval: 10 });
  });

  it('the first renewal is due a third of a lease after begin was sent, not after its (late) answer', async () => {
    // The claim lands at once, its answer comes 900 ms into a 1 200 ms lease: a renewal due 400 ms
    // after the answer (1 300 ms) would come after the lease had ended.
    const { store, engine, events } = setup({ leaseMs: 1_200 });
    const answers = answeringLate(store, 900);
    const lease = expectRun(await engine.decide(request({ key: 'late-answer' })));
    answers.onTime();
    await new Promise((r) => setTimeout(r, 600)); // past the end of the lease as first granted
    expectProblem(await engine.decide(request({ key: 'late-answer' })), 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    expect(events.some((e) => e.type === 'lease-lost')).toBe(false);
    expect(await lease.commit(response())).toBe(true);
  });

  it('reports a lost lease found by renewal', async () => {
    let now = 0;
    const store = createMemoryStore({ now: () => now });
    const events: string[] = [];
    const engine = createIdempotencyEngine({ store, leaseMs: 60, logger: false, onEvent: (e) => events.push(e.type) });
    const lease = expectRun(await engine.decide(request({ key: 'lost' })));
    now += 1_000; // the store's clock jumps past the lease, as a stalled process would see it
    await vi.waitFor(() => expect(events).toContain('lease-lost'), { timeout: 10_000 });
    expect(await lease.commit(response())).toBe(false);
  });
});

/** A store whose every call fails, as a broken connection would: the engine's policy is under test. */
function failingStore(error: Error): IdempotencyStore {
  const fail = () => Promise.reject(error);
  return { shared: true, begin: fail, complete: fail, release: fail, renew: fail, get: fail, purgeExpired: fail, close: async () => {} };
}

describe('store failures', () => {
  it('fail closed: 503 with the driver error as cause, handler not run', async () => {
    const cause = new Error('ECONNREFUSED');
    const events: string[] = [];
    const engine = createIdempotencyEngine({ store: failingStore(cause), logger: false, onEvent: (e) => events.push(e.type) });
    const error = expectProblem(await engine.decide(request({ key: 'k' })), 503, 'ERR_IDEMKIT_STORE_UNAVAILABLE');
    expect(error).toBeInstanceOf(StoreUnavailableError);
    expect(error.cause).toBe(cause);
    expect(events).toEqual(['store-error']);
  });

  it("onStoreError: 'pass' runs without idempotency (never a replay)", async () => {
    const engine = createIdempotencyEngine({ store: failingStore(new Error('down')), onStoreError: 'pass', logger: false });
    expect(await engine.decide(request({ key: 'k' }))).toEqual({ kind: 'pass' });
  });

  it('a hung store answers 503 within storeTimeoutMs', async () => {
    const hung: IdempotencyStore = { ...failingStore(new Error()), begin: () => new Promise(() => {}) };
    const engine = createIdempotencyEngine({ store: hung, storeTimeoutMs: 100, logger: false });
    const started = Date.now();
    const error = expectProblem(await engine.decide(request({ key: 'k' })), 503, 'ERR_IDEMKIT_STORE_UNAVAILABLE');
    expect((error.cause as Error).name).toBe('StoreTimeoutError');
    expect(Date.now() - started).toBeLessThan(2_000);
  });

  it('a memory store subclass that hangs still answers 503 (only core’s own memory store skips the deadline)', async () => {
    class HungStore extends MemoryStore {
      override begin(): Promise<BeginResult> {
        return new Promise(() => {});
      }
    }
    const engine = createIdempotencyEngine({ store: new HungStore(), storeTimeoutMs: 50, logger: false });
    const error = expectProblem(await engine.decide(request({ key: 'k' })), 503, 'ERR_IDEMKIT_STORE_UNAVAILABLE');
    expect((error.cause as Error).name).toBe('StoreTimeoutError');
  });

  it('a begin that lands after its timeout gives the key back', async () => {
    const store = createMemoryStore();
    const begin = store.begin.bind(store);
    let landed = false;
    store.begin = async (...args) => {
      await new Promise((r) => setTimeout(r, 150));
      const result = await begin(...args);
      landed = true;
      return result;
    };
    const engine = createIdempotencyEngine({ store, storeTimeoutMs: 50, logger: false });
    expectProblem(await engine.decide(request({ key: 'late' })), 503, 'ERR_IDEMKIT_STORE_UNAVAILABLE');
    await vi.waitFor(() => expect(landed).toBe(true), { timeout: 10_000 });
    await vi.waitFor(async () => expect(await store.get('-:late')).toBeUndefined(), { timeout: 10_000 });
  });

  it('a store that fails after the handler ran: the lease settles without throwing and reports it', async () => {
    const store = createMemoryStore();
    const events: string[] = [];
    const logger = { warn: vi.fn(), error: vi.fn() };
    const engine = createIdempotencyEngine({ store, logger, onEvent: (e) => events.push(e.type) });
    const lease = expectRun(await engine.decide(request({ key: 'k' })));
    store.complete = () => Promise.reject(new Error('gone'));
    store.release = () => Promise.reject(new Error('gone'));
    expect(await lease.commit(response())).toBe(false);
    const other = expectRun(await engine.decide(request({ key: 'k2' })));
    await other.abandon('handler-threw');
    expect(events.filter((e) => e === 'store-error')).toHaveLength(2);
    expect(logger.error).toHaveBeenCalled();
  });

  it('a completion the store failed is retried in the background: retries replay, the handler never runs twice', async () => {
    // The store is away for the first completion only (a blip, a failover).
    const store = createMemoryStore();
    const events: Array<{ type: string; stored?: boolean }> = [];
    const engine = createIdempotencyEngine({ store, logger: false, leaseMs: 300, onEvent: (e) => events.push(e) });
    const lease = expectRun(await engine.decide(request({ key: 'blip' })));
    const complete = store.complete.bind(store);
    let failures = 0;
    store.complete = (...args) => (failures++ === 0 ? Promise.reject(new Error('connection reset')) : complete(...args));
    expect(await lease.commit(response(201, 'the answer'))).toBe(false);
    // Not stored yet: the key stays held (409), it does not fall free for a second run.
    expectProblem(await engine.decide(request({ key: 'blip' })), 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    await vi.waitFor(async () => expect((await engine.decide(request({ key: 'blip' }))).kind).toBe('replay'), { timeout: 3_000, interval: 20 });
    const replay = await engine.decide(request({ key: 'blip' }));
    expect(replay.kind === 'replay' && new TextDecoder().decode(replay.response.body)).toBe('the answer');
    expect(events).toContainEqual({ type: 'completed', key: 'blip', status: 201, stored: true });
  });

  it('while a completion is retried the lease keeps renewing, so it outlasts its lease', async () => {
    const store = createMemoryStore();
    const engine = createIdempotencyEngine({ store, logger: false, leaseMs: 300 });
    const lease = expectRun(await engine.decide(request({ key: 'long-blip' })));
    const complete = store.complete.bind(store);
    let away = true;
    store.complete = (...args) => (away ? Promise.reject(new Error('failover')) : complete(...args));
    expect(await lease.commit(response(201, 'kept'))).toBe(false);
    // Two leases later the key is still held by this lease: nobody could take it over and run again.
    await new Promise((resolve) => setTimeout(resolve, 700));
    expectProblem(await engine.decide(request({ key: 'long-blip' })), 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    away = false;
    await vi.waitFor(async () => expect((await engine.decide(request({ key: 'long-blip' }))).kind).toBe('replay'), { timeout: 3_000, interval: 20 });
  });

  it('a store away for longer than the lease: the retried completion gives up, reports the lease lost, and says so', async () => {
    // Stores refuse a holder whose lease ran out, and renewals fail during the same outage.
    const store = createMemoryStore();
    const events: Array<{ type: string; operation?: string }> = [];
    const logger = { warn: vi.fn(), error: vi.fn() };
    const engine = createIdempotencyEngine({ store, logger, leaseMs: 200, onEvent: (e) => events.push(e) });
    const lease = expectRun(await engine.decide(request({ key: 'long-outage' })));
    const complete = store.complete.bind(store);
    const renew = store.renew.bind(store);
    let away = true;
    store.complete = (...args) => (away ? Promise.reject(new Error('down')) : complete(...args));
    store.renew = (...args) => (away ? Promise.reject(new Error('down')) : renew(...args));
    expect(await lease.commit(response(201, 'lost'))).toBe(false);
    await vi.waitFor(() => expect(events.some((e) => e.type === 'lease-lost')).toBe(true), { timeout: 3_000, interval: 20 });
    away = false;
    // Never a false 'stored' report; the next request takes the expired lease over.
    expect(events).not.toContainEqual(expect.objectContaining({ type: 'completed', stored: true }));
    expect(events.filter((e) => e.type === 'store-error' && e.operation === 'complete')).toHaveLength(1);
    expect(logger.error).toHaveBeenCalledWith(expect.stringContaining('Gave up storing the answer for key "long-outage"'));
    const next = expectRun(await engine.decide(request({ key: 'long-outage' })));
    expect(next.tookOver).toBe(true);
  });

  /** What a retry with `key` replays, once it replays something (a background completion landed). */
  async function eventualReplay(engine: ReturnType<typeof setup>['engine'], key: string): Promise<StoredResponse> {
    return vi.waitFor(
      async () => {
        const decision = await engine.decide(request({ key }));
        if (decision.kind !== 'replay') throw new Error(`not replayed yet: ${decision.kind}`);
        return decision.response;
      },
      { timeout: 5_000, interval: 20 },
    );
  }

  it('a store that renews but keeps failing the completion: renewals stop after two leases, so the key is not held for good', async () => {
    // A payload limit or a per-statement timeout: the small renewal gets through, the answer never does.
    const logger = { warn: vi.fn(), error: vi.fn() };
    const { store, engine, events } = setup({ logger, leaseMs: 200 });
    const lease = expectRun(await engine.decide(request({ key: 'refused-write' })));
    let renewals = 0;
    const renew = store.renew.bind(store);
    store.renew = (...args) => {
      renewals++;
      return renew(...args);
    };
    store.complete = () => Promise.reject(new Error('payload too large'));
    expect(await lease.commit(response(201, 'never stored'))).toBe(false);
    // Held past its first lease (a blip may still clear), then given up and reported.
    await new Promise((resolve) => setTimeout(resolve, 300));
    expectProblem(await engine.decide(request({ key: 'refused-write' })), 409, 'ERR_IDEMKIT_REQUEST_IN_PROGRESS');
    await vi.waitFor(() => expect(events).toContainEqual({ type: 'lease-lost', key: 'refused-write', operation: 'complete' }), { timeout: 5_000, interval: 20 });
    expect(renewals).toBeGreaterThan(0);
    expect(logger.error).toHaveBeenCalledWith(expect.stringContaining('Gave up storing the answer for key "refused-write"'));
    // Nothing renews it any more: the next request takes the lapsed lease over.
    const next = expectRun(await engine.decide(request({ key: 'refused-write' })));
    expect(next.tookOver).toBe(true);
    await next.abandon('handler-threw');
  });

  it('a store that renews but refuses only the answer (a payload limit): after two leases the 410 marker is stored, never a second run', async () => {
    const logger = { warn: vi.fn(), error: vi.fn() };
    const { store, engine, events } = setup({ logger, leaseMs: 200 });
    const lease = expectRun(await engine.decide(request({ key: 'too-big-for-store' })));
    const complete = store.complete.bind(store);
    store.complete = (key, token, answer, ttlMs) =>
      answer.body.byteLength > 1_000 ? Promise.reject(new Error('payload too large')) : complete(key, token, answer, ttlMs);
    expect(await lease.commit(response(201, 'x'.repeat(2_000)))).toBe(false);
    const retry = await eventualReplay(engine, 'too-big-for-store');
    expect(retry.status).toBe(410);
    expect(JSON.parse(new TextDecoder().decode(retry.body))).toMatchObject({ originalStatus: 201, reason: 'store-refused' });
    expect(events).toContainEqual({ type: 'completed', key: 'too-big-for-store', status: 201, stored: false });
    expect(events.some((e) => e.type === 'lease-lost')).toBe(false);
    expect(logger.error).toHaveBeenCalledWith(expect.stringContaining('stored the 410 marker'));
  });

  it('a 410 marker whose first attempt fails is retried until the lease ends, never a second run', async () => {
    const { store, engine, events } = setup({ leaseMs: 200 });
    const lease = expectRun(await engine.decide(request({ key: 'marker-blip' })));
    const complete = store.complete.bind(store);
    let markerAttempts = 0;
    store.complete = async (key, token, answer, ttlMs) => {
      if (answer.body.byteLength > 1_000) throw new Error('payload too large');
      if (markerAttempts++ === 0) throw new Error('blip');
      return complete(key, token, answer, ttlMs);
    };
    expect(await lease.commit(response(201, 'x'.repeat(2_000)))).toBe(false);
    await vi.waitFor(() => expect(events).toContainEqual({ type: 'completed', key: 'marker-blip', status: 201, stored: false }), { timeout: 5_000, interval: 20 });
    const retry = await engine.decide(request({ key: 'marker-blip' }));
    expect(retry.kind === 'replay' && retry.response.status).toBe(410);
    expect(events.some((e) => e.type === 'lease-lost')).toBe(false);
    expect(markerAttempts).toBe(2);
  });

  it('a store back just before the renewal budget ends gets the real answer, not the 410 marker', async () => {
    const { store, engine, events } = setup({ leaseMs: 300 });
    const lease = expectRun(await engine.decide(request({ key: 'back-in-time' })));
    const complete = store.complete.bind(store);
    const startedAt = performance.now();
    // Away (each attempt hangs 200 ms, then fails) until 30 ms before the budget ends (two leases
    // after the first failure, at 200 ms): the attempt sent at ~700 ms fails after that end.
    store.complete = async (...args) => {
      const away = performance.now() - startedAt < 770;
      if (away) await new Promise((resolve) => setTimeout(resolve, 200));
      return away ? Promise.reject(new Error('failover')) : complete(...args);
    };
    expect(await lease.commit(response(201, 'the real answer'))).toBe(false);
    const replay = await eventualReplay(engine, 'back-in-time');
    expect([replay.status, new TextDecoder().decode(replay.body)]).toEqual([201, 'the real answer']);
    expect(events).toContainEqual({ type: 'completed', key: 'back-in-time', status: 201, stored: true });
  });

  it('a 410 marker that landed although its reply was lost is reported as the marker, not as a lost lease', async () => {
    const logger = { warn: vi.fn(), error: vi.fn() };
    // A lease long enough that a loaded CI machine still sends the marker within the retry budget
    // (two leases): at 200 ms it once gave up first, and the key was left in progress.
    const { store, engine, events } = setup({ logger, leaseMs: 1_000 });
    const lease = expectRun(await engine.decide(request({ key: 'marker-reply-lost' })));
    const complete = store.complete.bind(store);
    store.complete = async (key, token, answer, ttlMs) => {
      if (answer.body.byteLength > 1_000) throw new Error('payload too large');
      await complete(key, token, answer, ttlMs);
      throw new Error('reply lost'); // the marker landed; its answer did not come back
    };
    expect(await lease.commit(response(201, 'x'.repeat(2_000)))).toBe(false);
    await vi.waitFor(() => expect(events).toContainEqual({ type: 'completed', key: 'marker-reply-lost', status: 201, stored: false }), { timeout: 5_000, interval: 20 });
    const retry = await engine.decide(request({ key: 'marker-reply-lost' }));
    expect(retry.kind === 'replay' && retry.response.status).toBe(410);
    expect(events.some((e) => e.type === 'lease-lost')).toBe(false);
    expect(logger.error).toHaveBeenCalledWith(expect.stringContaining('stored the 410 marker'));
    expect(logger.error).not.toHaveBeenCalledWith(expect.stringContaining('Gave up storing'));
  });

  it('a store that hangs (not refuses) past the lease: the retried completion still gives up at the lease end', async () => {
    // With storeTimeoutMs above a third of the lease a renewal is nearly always in flight; only
    // one sent before the lease end may hold the give-up off.
    const store = createMemoryStore();
    const events: IdempotencyEvent[] = [];
    const engine = createIdempotencyEngine({ store, logger: false, leaseMs: 300, storeTimeoutMs: 400, onEvent: (e) => events.push(e) });
    const lease = expectRun(await engine.decide(request({ key: 'hangs' })));
    const hang = () => new Promise<never>(() => undefined);
    store.complete = hang;
    store.renew = hang;
    expect(await lease.commit(response(201, 'lost'))).toBe(false);
    await vi.waitFor(() => expect(events).toContainEqual({ type: 'lease-lost', key: 'hangs', operation: 'complete' }), { timeout: 5_000, interval: 20 });
  });

  it('a completion that landed although it failed here is reported stored, never lost', async () => {
    const store = createMemoryStore();
    const events: Array<{ type: string; stored?: boolean }> = [];
    const engine = createIdempotencyEngine({ store, logger: false, leaseMs: 150, onEvent: (e) => events.push(e) });
    const lease = expectRun(await engine.decide(request({ key: 'landed' })));
    const complete = store.complete.bind(store);
    let calls = 0;
    // The first completion lands, but its answer is lost on the way back (a timeout here).
    store.complete = async (...args) => {
      const ok = await complete(...args);
      if (calls++ === 0) throw new Error('reply lost');
      return ok;
    };
    expect(await lease.commit(response(201, 'mine'))).toBe(false);
    await vi.waitFor(() => expect(events).toContainEqual({ type: 'completed', key: 'landed', status: 201, stored: true }), { timeout: 3_000, interval: 10 });
    expect(events.some((e) => e.type === 'lease-lost')).toBe(false);
    expect((await engine.decide(request({ key: 'landed' }))).kind).toBe('replay');
  });

  it('renewals go on when the wall clock steps back (NTP, a resumed VM): the running key is never taken over', async () => {
    const wall = Date.now.bind(Date);
    // The store keeps real time, as Redis or Postgres would: only this process's clock steps.
    const store = createMemoryStore({ now: () => wall() });
    const engine = createIdempotencyEngine({ store, logger: false, leaseMs: 300 });
    const running = expectRun(await engine.decide(request({ key: 'stepped' })));
    const stepped = vi.spyOn(Date, 'now').mockImplementation(() => wall() - 600_000);
    try {
      // Three leases long: without renewals the store lets the key go after the first.
      await new Promise((resolve) => setTimeout(resolve, 900));
      const second = await engine.decide(request({ key: 'stepped' }));
      expect(second.kind).toBe('problem');
      if (second.kind === 'problem') expect(second.error.statusCode).toBe(409);
      expect(await running.commit(response(201, 'once'))).toBe(true);
    } finally {
      stepped.mockRestore();
    }
  });

  it("someone else's answer in the record is not counted as this lease's: lease-lost, not stored", async () => {
    let now = Date.now();
    const store = createMemoryStore({ now: () => now });
    const events: IdempotencyEvent[] = [];
    const engine = createIdempotencyEngine({ store, logger: false, leaseMs: 1_000, onEvent: (e) => events.push(e) });
    const stalled = expectRun(await engine.decide(request({ key: 'taken' })));
    const complete = store.complete.bind(store);
    let away = true;
    store.complete = (...args) => (away ? Promise.reject(new Error('down')) : complete(...args));
    expect(await stalled.commit(response(201, 'mine'))).toBe(false);
    now += 5_000; // the stalled holder's lease ran out by the store's clock; another takes over
    away = false;
    const winner = expectRun(await engine.decide(request({ key: 'taken' })));
    expect(await winner.commit(response(202, 'theirs'))).toBe(true);
    await vi.waitFor(() => expect(events.filter((e) => e.type === 'lease-lost')).toHaveLength(1), { timeout: 3_000, interval: 10 });
    expect(events).not.toContainEqual({ type: 'completed', key: 'taken', status: 201, stored: true });
    const replay = await engine.decide(request({ key: 'taken' }));
    expect(replay.kind === 'replay' && replay.response.status).toBe(202);
  });

  it('a scope or custom fingerprint that stores cannot keep (a lone surrogate, NUL) is refused before the store sees it', async () => {
    // Stores write UTF-8, where each lone surrogate becomes U+FFFD: 'u\ud800' and 'u\udc00' would
    // be one scope (two tenants, one key), and such a fingerprint would never match itself.
    const tenant = (value: unknown) => createIdempotencyEngine({ store: createMemoryStore(), logger: false, scope: () => value as string });
    await expect(tenant('u\ud800').decide(request({ key: 'k' }))).rejects.toThrow(/`scope` returned a string with a lone surrogate/);
    await expect(tenant({ id: 42 }).decide(request({ key: 'k' }))).rejects.toThrow('`scope` must return a string, a finite number or a bigint, or undefined.');
    await expect(tenant(Number.NaN).decide(request({ key: 'k' }))).rejects.toThrow('`scope` must return a string, a finite number or a bigint');
    expectRun(await tenant('tenant-\u{1F600}').decide(request({ key: 'k' })));
    const printed = (value: unknown) => createIdempotencyEngine({ store: createMemoryStore(), logger: false, fingerprint: () => value as string });
    await expect(printed('lone\udc00').decide(request({ key: 'k' }))).rejects.toThrow(/`fingerprint` returned a string with a lone surrogate/);
    await expect(printed(undefined).decide(request({ key: 'k' }))).rejects.toThrow('`fingerprint` must return a string.');
    // NUL: Postgres text refuses it (a binary digest has one in about 1 of 8 cases): 503 forever.
    await expect(printed('digest\u0000bytes').decide(request({ key: 'k' }))).rejects.toThrow(/lone surrogate or a NUL character/);
    await expect(tenant('tenant\u0000').decide(request({ key: 'k' }))).rejects.toThrow(/`scope` returned a string with a lone surrogate or a NUL/);
  });

  it('a numeric user id is a scope (the README example `req.user.id`): 42, 42n and "42" are one tenant, 43 another', async () => {
    let user: unknown = 42;
    const engine = createIdempotencyEngine({ store: createMemoryStore(), logger: false, scope: () => user as string });
    // Before, a number made every request a 500.
    const first = expectRun(await engine.decide(request({ key: 'k' })));
    await first.commit(response(201, 'order 1'));
    for (const same of ['42', 42n]) {
      user = same;
      const again = await engine.decide(request({ key: 'k' }));
      expect(again.kind === 'replay' && again.response.status).toBe(201);
    }
    user = 43;
    expectRun(await engine.decide(request({ key: 'k' })));
  });

  it('an onEvent hook that throws never changes the decision', async () => {
    const engine = createIdempotencyEngine({ store: createMemoryStore(), logger: false, onEvent: () => { throw new Error('metrics down'); } });
    expectRun(await engine.decide(request({ key: 'k' })));
  });

  it('a logger that throws or rejects (a log transport that is down), or an onEvent that rejects, never ends the process', async () => {
    const inner = createMemoryStore();
    let renewals = 0;
    const store: IdempotencyStore = {
      shared: inner.shared,
      // A long lease in the store: every renewal fails here, and the commits below must still hold
      // it however slow the machine is (the engine's 90 ms lease only paces the renewals).
      begin: (key, fingerprint) => inner.begin(key, fingerprint, 60_000),
      complete: (key, token, response, ttlMs) => inner.complete(key, token, response, ttlMs),
      release: (key, token) => inner.release(key, token),
      renew: async () => {
        renewals++;
        throw new Error('store blip');
      },
      get: (key) => inner.get(key),
      purgeExpired: (limit) => inner.purgeExpired(limit),
      close: () => inner.close(),
    };
    const escaped: unknown[] = [];
    const onRejection = (reason: unknown): void => void escaped.push(reason);
    process.on('unhandledRejection', onRejection);
    try {
      const sinkDown = (): never => {
        throw new Error('log sink down');
      };
      // And an async logger, and an async onEvent, whose promises reject.
      const sinkAway = async (): Promise<void> => {
        throw new Error('async log sink down');
      };
      const engine = createIdempotencyEngine({ store, leaseMs: 90, logger: { warn: sinkDown, error: sinkDown } });
      const asyncEngine = createIdempotencyEngine({ store, leaseMs: 90, logger: { warn: sinkAway, error: sinkAway }, onEvent: sinkAway });
      const lease = expectRun(await engine.decide(request({ key: 'k' })));
      const asyncLease = expectRun(await asyncEngine.decide(request({ key: 'k2' })));
      // Each failed renewal is logged (from a timer) with the throwing logger.
      await vi.waitFor(() => expect(renewals).toBeGreaterThanOrEqual(2), { timeout: 3_000, interval: 10 });
      await new Promise((resolve) => setImmediate(resolve));
      expect(await lease.commit(response(201, 'ok'))).toBe(true);
      expect(await asyncLease.commit(response(201, 'ok'))).toBe(true);
      await new Promise((resolve) => setImmediate(resolve));
      expect(escaped).toEqual([]);
    } finally {
      process.off('unhandledRejection', onRejection);
    }
  });

  it('warns once when the in-memory store runs in production', () => {
    const warn = vi.fn();
    const previous = process.env.NODE_ENV;
    process.env.NODE_ENV = 'production';
    try {
      createIdempotencyEngine({ store: createMemoryStore(), logger: { warn, error: vi.fn() } });
    } finally {
      process.env.NODE_ENV = previous;
    }
    expect(warn).toHaveBeenCalledTimes(1);
    expect(warn.mock.calls[0]?.[0]).toContain('in-memory store');
  });

  it('does not take a store written in JavaScript without `shared` for the in-memory one', () => {
    const warn = vi.fn();
    const previous = process.env.NODE_ENV;
    process.env.NODE_ENV = 'production';
    const memory = createMemoryStore();
    const { shared: _shared, ...jsStore } = Object.assign(Object.create(null) as object, {
      shared: undefined,
      begin: memory.begin.bind(memory),
      complete: memory.complete.bind(memory),
      release: memory.release.bind(memory),
      renew: memory.renew.bind(memory),
      get: memory.get.bind(memory),
      purgeExpired: memory.purgeExpired.bind(memory),
      close: memory.close.bind(memory),
    });
    try {
      createIdempotencyEngine({ store: jsStore as never, logger: { warn, error: vi.fn() } });
    } finally {
      process.env.NODE_ENV = previous;
    }
    expect(warn).not.toHaveBeenCalled();
  });
});

describe('problem bodies', () => {
  it('are RFC 9457 with stable type URIs', async () => {
    const { engine } = setup();
    const error = expectProblem(await engine.decide(request({ key: '' })), 400, 'ERR_IDEMKIT_KEY_INVALID');
    expect(error.statusCode).toBe(400);
    expect(error.expose).toBe(true);
    expect(error.name).toBe('KeyError');
    expect(error.type).toBe('https://idemkit.dev/problems/key-invalid');
    expect(enc.encode(JSON.stringify(error.toProblem())).length).toBeGreaterThan(0);
  });
});
