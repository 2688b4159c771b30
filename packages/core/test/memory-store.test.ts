import { describe, expect, it, vi } from 'vitest';
import { createMemoryStore, idempotent, MemoryStoreFullError, startPurger, type LeaseToken } from '../src/index.js';

const resp = { status: 200, headers: [] as Array<[string, string]>, body: new Uint8Array([1]) };

describe('MemoryStore specifics', () => {
  it('is bounded: expired entries go first, then the oldest completed ones', async () => {
    let now = 0;
    const store = createMemoryStore({ maxEntries: 3, now: () => now });
    const a = await store.begin('a', null, 1_000);
    const b = await store.begin('b', null, 1_000);
    if (a.kind !== 'acquired' || b.kind !== 'acquired') throw new Error('expected acquired');
    await store.complete('a', a.token, resp, 10);
    await store.complete('b', b.token, resp, 100_000);
    await store.begin('c', null, 1_000);
    now = 50; // a expired
    await store.begin('d', null, 1_000);
    expect(store.size).toBe(3);
    expect(await store.get('a')).toBeUndefined();
    await store.begin('e', null, 1_000); // full of live entries: the oldest completed (b) goes
    expect(await store.get('b')).toBeUndefined();
    expect((await store.get('c'))?.state).toBe('in_progress');
    await expect(store.begin('f', null, 1_000)).rejects.toBeInstanceOf(MemoryStoreFullError);
  });

  it('when full, expired records go before live ones even when they are not the oldest (several TTLs)', async () => {
    let now = 0;
    const store = createMemoryStore({ maxEntries: 200, now: () => now });
    const fill = async (prefix: string, ttlMs: number) => {
      for (let i = 0; i < 100; i++) {
        const r = await store.begin(`${prefix}${i}`, null, 60_000);
        if (r.kind === 'acquired') await store.complete(`${prefix}${i}`, r.token, resp, ttlMs);
      }
    };
    await fill('day-', 86_400_000);
    await fill('minute-', 60_000);
    now = 120_000; // the one-minute records have expired, the one-day ones have not
    await store.begin('new', null, 60_000);
    // A retry of a live record must still replay, not run a second time.
    for (const i of [0, 1, 50, 99]) expect((await store.get(`day-${i}`))?.state).toBe('completed');
    expect(store.size).toBe(101);
  });

  it('when full, frees 1% of the oldest completed records at once, so the next inserts need no search', async () => {
    const store = createMemoryStore({ maxEntries: 1_000 });
    for (let i = 0; i < 1_000; i++) {
      const r = await store.begin(`k${i}`, null, 60_000);
      if (r.kind === 'acquired') await store.complete(`k${i}`, r.token, resp, 60_000);
    }
    expect(store.size).toBe(1_000);
    await store.begin('one-more', null, 60_000);
    expect(store.size).toBe(991);
    expect(await store.get('k0')).toBeUndefined();
    expect(await store.get('k9')).toBeUndefined();
    expect((await store.get('k10'))?.state).toBe('completed');
  });

  it('really evicts expired entries (purge, and on read)', async () => {
    let now = 0;
    const store = createMemoryStore({ now: () => now });
    for (const k of ['x', 'y', 'z']) {
      const r = await store.begin(k, null, 1_000);
      if (r.kind === 'acquired') await store.complete(k, r.token, resp, 10);
    }
    now = 20;
    expect(await store.get('x')).toBeUndefined();
    expect(store.size).toBe(2);
    expect(await store.purgeExpired(1)).toBe(1);
    expect(await store.purgeExpired()).toBe(1);
    expect(store.size).toBe(0);
  });

  it('copies response bytes so later mutation of the caller buffer changes nothing', async () => {
    const store = createMemoryStore();
    const r = await store.begin('k', null, 1_000);
    const body = new Uint8Array([1, 2, 3]);
    if (r.kind === 'acquired') await store.complete('k', r.token, { status: 200, headers: [], body }, 1_000);
    body[0] = 9;
    expect([...((await store.get('k'))?.response?.body ?? [])]).toEqual([1, 2, 3]);
    expect(await store.release('k', 'bogus' as LeaseToken)).toBe(false);
  });

  it('once closed, rejects every call; a duplicate waiting on a running job never runs it beside the first', async () => {
    const store = createMemoryStore();
    let runs = 0;
    let finish!: () => void;
    const job = idempotent(
      async (_id: string) => {
        runs++;
        await new Promise<void>((resolve) => (finish = resolve));
        return { run: runs };
      },
      { store, name: 'c', key: (id) => id, logger: false },
    );
    const first = job('e1');
    await vi.waitFor(() => expect(runs).toBe(1));
    const duplicate = job('e1'); // waits on the running call (concurrency 'wait')
    await store.close(); // a SIGTERM handler that did not wait for running calls
    // Before: close() emptied the map and the store went on, so the duplicate's next look claimed
    // the key and ran fn a second time while the first was still at work.
    await expect(duplicate).rejects.toMatchObject({ code: 'ERR_IDEMKIT_STORE_UNAVAILABLE' });
    finish();
    expect(await first).toEqual({ run: 1 }); // fn's result is the truth, though it was not stored
    expect(runs).toBe(1);
    for (const call of [store.begin('k', null, 1_000), store.get('k'), store.complete('k', 't' as LeaseToken, { status: 200, headers: [], body: new Uint8Array() }, 1_000), store.renew('k', 't' as LeaseToken, 1_000), store.release('k', 't' as LeaseToken), store.purgeExpired()]) {
      await expect(call).rejects.toThrow('[idemkit] [memory] The store is closed.');
    }
    await expect(store.close()).resolves.toBeUndefined();
  });

  it('rejects a bad maxEntries or clock, and warns about an option it does not know', () => {
    expect(() => createMemoryStore({ maxEntries: 0 })).toThrow(/maxEntries/);
    // A clock value instead of a clock: refused at creation, not with a TypeError (and a 503) on every begin.
    expect(() => createMemoryStore({ now: Date.now() as unknown as () => number })).toThrow(/`now` must be a function/);
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => undefined);
    try {
      createMemoryStore({ maxEntry: 5 } as never);
      expect(warn).toHaveBeenCalledWith('[idemkit] [memory] Unknown option(s) ignored: maxEntry.');
    } finally {
      warn.mockRestore();
    }
  });
});

describe('startPurger', () => {
  it('sweeps expired records in batches until a batch comes back short, and stops', async () => {
    let now = 0;
    const store = createMemoryStore({ now: () => now });
    for (let i = 0; i < 25; i++) {
      const r = await store.begin(`k${i}`, null, 1_000);
      if (r.kind === 'acquired') await store.complete(`k${i}`, r.token, resp, 10);
    }
    await store.begin('live', null, 60_000);
    now = 100;
    const purger = startPurger(store, { intervalMs: 20, batchSize: 10 });
    await expect.poll(() => store.size).toBe(1);
    expect(await purger.runOnce()).toBe(0);
    await purger.stop();
  });

  it('reports failed sweeps and keeps going', async () => {
    const store = createMemoryStore();
    let calls = 0;
    store.purgeExpired = async () => {
      calls++;
      throw new Error('db down');
    };
    const errors: unknown[] = [];
    const purger = startPurger(store, { intervalMs: 10, onError: (e) => errors.push(e) });
    await expect.poll(() => errors.length).toBeGreaterThanOrEqual(2);
    await purger.stop();
    expect(calls).toBeGreaterThanOrEqual(2);
  });

  // Was: a sweep waited on the hung call for good: no later sweep ran, onError never heard of it,
  // and stop() (in a shutdown hook) never returned.
  it('gives up on a purgeExpired that never answers: the sweep fails with a timeout, the next one runs, and stop() returns', async () => {
    const store = createMemoryStore();
    let calls = 0;
    store.purgeExpired = () => {
      calls++;
      return new Promise<number>(() => undefined);
    };
    const errors: unknown[] = [];
    const purger = startPurger(store, { intervalMs: 20, timeoutMs: 50, onError: (e) => errors.push(e) });
    await expect.poll(() => errors.length).toBeGreaterThanOrEqual(2);
    expect(String(errors[0])).toMatch(/`purgeExpired` did not answer within 50 ms/);
    expect(calls).toBeGreaterThanOrEqual(2);
    await expect(purger.runOnce()).rejects.toThrow(/did not answer within 50 ms/);
    const stopping = purger.runOnce().catch(() => undefined);
    await purger.stop();
    await stopping;
  });

  it('refuses a store whose purgeExpired resolves to no count, instead of calling it in a loop for good', async () => {
    const store = createMemoryStore();
    let calls = 0;
    store.purgeExpired = (async () => {
      calls++;
    }) as unknown as typeof store.purgeExpired;
    const purger = startPurger(store, { intervalMs: 60_000, onError: () => {} });
    await expect(purger.runOnce()).rejects.toThrow(/purgeExpired\(\) must resolve to the number of records removed, not undefined/);
    expect(calls).toBe(1);
    await purger.stop();
  });

  it('validates its options', () => {
    expect(() => startPurger(createMemoryStore(), { intervalMs: 0 })).toThrow(/intervalMs/);
    expect(() => startPurger(createMemoryStore(), { batchSize: -1 })).toThrow(/batchSize/);
    expect(() => startPurger(createMemoryStore(), { timeoutMs: 0 })).toThrow(/timeoutMs/);
    expect(() => startPurger(createMemoryStore(), { timeoutMs: 2 ** 31 })).toThrow(/timeoutMs.*at most 2147483647/);
    expect(() => startPurger(createMemoryStore(), null as unknown as undefined)).toThrow(/`options` must be an object/);
  });

  // Was: accepted, and every sweep failed (a log line a minute) while expired records piled up.
  it('refuses a missing store, or the options passed in its place, at once', () => {
    const store = createMemoryStore();
    const errors: unknown[] = [];
    expect(() => startPurger(undefined as unknown as typeof store, { onError: (e) => errors.push(e) })).toThrow(/`store` must be an idempotency store/);
    expect(() => startPurger({ store, intervalMs: 10 } as unknown as typeof store)).toThrow(/`store` must be an idempotency store/);
    expect(errors).toEqual([]);
  });

  it('refuses an interval longer than a Node timer holds: it would fire every millisecond and sweep the store a thousand times a second', async () => {
    const store = createMemoryStore();
    let sweeps = 0;
    const purge = store.purgeExpired.bind(store);
    store.purgeExpired = async (limit) => {
      sweeps++;
      return purge(limit);
    };
    let purger: ReturnType<typeof startPurger> | undefined;
    try {
      // 35 days, as a user wanting a monthly sweep might write it.
      expect(() => (purger = startPurger(store, { intervalMs: 35 * 86_400_000 }))).toThrow(/intervalMs.*at most 2147483647/);
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(sweeps).toBe(0);
    } finally {
      await purger?.stop();
    }
    expect(() => startPurger(store, { intervalMs: 2_147_483_647 })).not.toThrow();
  });

  it('refuses an onError that is not a function: a failed sweep would be an unhandled rejection', () => {
    expect(() => startPurger(createMemoryStore(), { onError: 'log' as unknown as () => void })).toThrow(/onError/);
  });

  it('survives an onError that throws (a log transport that is down): a failed sweep never ends the process', async () => {
    const store = createMemoryStore();
    store.purgeExpired = async () => {
      throw new Error('db down');
    };
    const unhandled: unknown[] = [];
    const onUnhandled = (reason: unknown): void => void unhandled.push(reason);
    process.on('unhandledRejection', onUnhandled);
    let calls = 0;
    const purger = startPurger(store, {
      intervalMs: 10,
      onError: () => {
        calls++;
        throw new Error('log transport down');
      },
    });
    try {
      await expect.poll(() => calls).toBeGreaterThanOrEqual(2);
      // Unhandled rejections are reported on the turn after they happen.
      await new Promise((resolve) => setImmediate(resolve));
      expect(unhandled).toEqual([]);
    } finally {
      await purger.stop();
      process.off('unhandledRejection', onUnhandled);
    }
  });
});
