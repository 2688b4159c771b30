import { describe, expect, it } from 'vitest';
import { ConfigurationError, createIdempotencyEngine, createMemoryStore, type Decision, type IdempotencyOptions, type IdempotencyStore } from '../src/index.js';
import { request, response } from './helpers.js';

/** The store's `begin` calls, counted: what the local cache saves. */
function counting(store: IdempotencyStore): { begins: () => number } {
  const begin = store.begin.bind(store);
  let n = 0;
  store.begin = (...args) => {
    n++;
    return begin(...args);
  };
  return { begins: () => n };
}

function engineOn(store: IdempotencyStore, options: Partial<IdempotencyOptions> = {}) {
  return createIdempotencyEngine({ store, logger: false, localCache: true, ...options });
}

async function runOnce(decision: Decision, status = 201, body = '{"id":1}'): Promise<void> {
  if (decision.kind !== 'run') throw new Error(`expected run, got ${decision.kind}`);
  expect(await decision.lease.commit(response(status, body))).toBe(true);
}

const replayed = (d: Decision): string => {
  if (d.kind !== 'replay') throw new Error(`expected replay, got ${d.kind}`);
  return new TextDecoder().decode(d.response.body);
};

const later = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('localCache', () => {
  it('replays a stored answer without asking the store again, byte for byte', async () => {
    const store = createMemoryStore();
    const calls = counting(store);
    const engine = engineOn(store);
    await runOnce(await engine.decide(request({ key: 'a' })));
    const replays = await Promise.all(Array.from({ length: 50 }, () => engine.decide(request({ key: 'a' }))));
    expect(replays.map(replayed)).toEqual(Array(50).fill('{"id":1}'));
    expect(calls.begins()).toBe(1);
  });

  it('is off by default: every replay asks the store', async () => {
    const store = createMemoryStore();
    const calls = counting(store);
    const engine = engineOn(store, { localCache: undefined });
    await runOnce(await engine.decide(request({ key: 'a' })));
    for (let i = 0; i < 5; i++) replayed(await engine.decide(request({ key: 'a' })));
    expect(calls.begins()).toBe(6);
  });

  it('still refuses another body under a cached key (422), without the store', async () => {
    const store = createMemoryStore();
    const calls = counting(store);
    const engine = engineOn(store);
    await runOnce(await engine.decide(request({ key: 'a' })));
    const other = await engine.decide(request({ key: 'a', body: { item: 'lamp', amount: 9 } }));
    expect(other.kind === 'problem' && other.error.status).toBe(422);
    expect(calls.begins()).toBe(1);
  });

  it('keeps an answer another process stored once it has read it from the store', async () => {
    const store = createMemoryStore();
    const calls = counting(store);
    await runOnce(await engineOn(store).decide(request({ key: 'a' })));
    const other = engineOn(store);
    replayed(await other.decide(request({ key: 'a' })));
    replayed(await other.decide(request({ key: 'a' })));
    expect(calls.begins()).toBe(2); // the first process's run, the second's first replay
  });

  it('never outlives the record: past ttlMs the key runs again', async () => {
    const store = createMemoryStore();
    const engine = engineOn(store, { ttlMs: 40 });
    await runOnce(await engine.decide(request({ key: 'a' })));
    replayed(await engine.decide(request({ key: 'a' })));
    await later(80);
    expect((await engine.decide(request({ key: 'a' }))).kind).toBe('run');
  });

  it('asks the store again after maxAgeMs, and after the oldest entry made room', async () => {
    const store = createMemoryStore();
    const calls = counting(store);
    const engine = engineOn(store, { localCache: { maxAgeMs: 40, maxEntries: 2 } });
    for (const key of ['a', 'b', 'c']) await runOnce(await engine.decide(request({ key })));
    replayed(await engine.decide(request({ key: 'c' })));
    replayed(await engine.decide(request({ key: 'b' })));
    expect(calls.begins()).toBe(3);
    replayed(await engine.decide(request({ key: 'a' }))); // 'a' made room for 'c'
    expect(calls.begins()).toBe(4);
    await later(80);
    replayed(await engine.decide(request({ key: 'a' }))); // aged out, still in the store
    expect(calls.begins()).toBe(5);
  });

  it('keeps nothing that was not stored: a 500 is run again', async () => {
    const store = createMemoryStore();
    const engine = engineOn(store);
    const first = await engine.decide(request({ key: 'a' }));
    if (first.kind !== 'run') throw new Error(first.kind);
    expect(await first.lease.commit(response(500))).toBe(false);
    expect((await engine.decide(request({ key: 'a' }))).kind).toBe('run');
  });

  it('keeps its own copy: a handler reusing its buffer, or a caller changing a replay, never changes the next replay', async () => {
    const engine = engineOn(createMemoryStore(), { scope: (req: { headers: Record<string, unknown> }) => String(req.headers['x-tenant']) });
    const shared = new TextEncoder().encode('{"tenant":"A"}');
    const asTenant = (tenant: string) => request({ key: 'k', headers: { 'idempotency-key': 'k', 'x-tenant': tenant } });
    const first = await engine.decide(asTenant('A'));
    if (first.kind !== 'run') throw new Error(first.kind);
    await first.lease.commit({ status: 201, headers: [['content-type', 'application/json']], body: shared });
    shared.set(new TextEncoder().encode('{"tenant":"B"}')); // the handler renders tenant B into the same buffer
    const replay = await engine.decide(asTenant('A'));
    expect(replayed(replay)).toBe('{"tenant":"A"}');
    if (replay.kind !== 'replay') throw new Error(replay.kind);
    replay.response.body.fill(0x21);
    expect(() => (replay.response.headers as Array<[string, string]>).push(['x-added', '1'])).toThrow(TypeError);
    const again = await engine.decide(asTenant('A'));
    expect(replayed(again)).toBe('{"tenant":"A"}');
    expect(again.kind === 'replay' && again.response.headers).toEqual([['content-type', 'application/json']]);
  });

  it('counts an answer\'s TTL from when its completion was sent, not from when the store answered', async () => {
    const store = createMemoryStore();
    const complete = store.complete.bind(store);
    store.complete = async (...args) => {
      const stored = await complete(...args); // the store starts the TTL here
      await later(60); // and its answer is slow to come back
      return stored;
    };
    const engine = engineOn(store, { ttlMs: 100 });
    await runOnce(await engine.decide(request({ key: 'a' })));
    await later(60); // the record is gone from the store by now
    expect((await engine.decide(request({ key: 'a' }))).kind).toBe('run');
  });

  it('does not keep an answer read from the store near its expiry: the two clocks may disagree by more than what is left', async () => {
    const store = createMemoryStore();
    const calls = counting(store);
    await runOnce(await engineOn(store, { ttlMs: 60_000 }).decide(request({ key: 'a' })));
    const reader = engineOn(store, { localCache: { maxAgeMs: 40_000 } }); // 60 s left < 2 × 40 s
    replayed(await reader.decide(request({ key: 'a' })));
    replayed(await reader.decide(request({ key: 'a' })));
    expect(calls.begins()).toBe(3);
  });

  it('keeps no body over maxEntryBytes, and keeps the answer replayed most recently when full', async () => {
    const store = createMemoryStore();
    const calls = counting(store);
    // The helper's headers count 54: an 8-byte body makes 62, kept; the 21-byte one 75, not.
    const engine = engineOn(store, { localCache: { maxEntryBytes: 64, maxEntries: 2 } });
    await runOnce(await engine.decide(request({ key: 'big' })), 201, '{"long":"0123456789"}');
    replayed(await engine.decide(request({ key: 'big' })));
    expect(calls.begins()).toBe(2); // 75 bytes: asked the store again
    await runOnce(await engine.decide(request({ key: 'hot' })));
    await runOnce(await engine.decide(request({ key: 'b' })));
    replayed(await engine.decide(request({ key: 'hot' }))); // now the most recent
    await runOnce(await engine.decide(request({ key: 'c' }))); // full: 'b' goes, not 'hot'
    const before = calls.begins();
    replayed(await engine.decide(request({ key: 'hot' })));
    expect(calls.begins()).toBe(before);
  });

  it('counts headers in maxEntryBytes: a small body with a large cookie is replayed from the store', async () => {
    const store = createMemoryStore();
    const calls = counting(store);
    const engine = engineOn(store, { localCache: { maxEntryBytes: 1_024 } });
    const first = await engine.decide(request({ key: 'cookie' }));
    if (first.kind !== 'run') throw new Error(`expected run, got ${first.kind}`);
    expect(await first.lease.commit({ ...response(201, '{"id":1}'), headers: [['set-cookie', `s=${'x'.repeat(2_000)}`]] })).toBe(true);
    replayed(await engine.decide(request({ key: 'cookie' })));
    replayed(await engine.decide(request({ key: 'cookie' })));
    // Before: the 8-byte body was kept with its 2 KB header, past the limit; the store saw one begin.
    expect(calls.begins()).toBe(3);
  });

  it('refuses a bad setting at setup', () => {
    const store = createMemoryStore();
    expect(() => engineOn(store, { localCache: 'yes' as never })).toThrow(ConfigurationError);
    expect(() => engineOn(store, { localCache: { maxEntries: 0 } })).toThrow(/localCache.maxEntries/);
    expect(() => engineOn(store, { localCache: { maxEntry: 5 } as never })).toThrow(/maxEntries, maxAgeMs, maxEntryBytes/);
    expect(() => engineOn(store, { localCache: [] as never })).toThrow(ConfigurationError);
    expect(() => engineOn(store, { localCache: false })).not.toThrow();
  });
});
