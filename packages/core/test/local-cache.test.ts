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

  it('refuses a bad setting at setup', () => {
    const store = createMemoryStore();
    expect(() => engineOn(store, { localCache: 'yes' as never })).toThrow(ConfigurationError);
    expect(() => engineOn(store, { localCache: { maxEntries: 0 } })).toThrow(/localCache.maxEntries/);
    expect(() => engineOn(store, { localCache: false })).not.toThrow();
  });
});
