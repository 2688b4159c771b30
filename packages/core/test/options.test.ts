import { describe, expect, it, vi } from 'vitest';
import { ConfigurationError, createMemoryStore, DEFAULTS, defaultStorable, resolveOptions, type IdempotencyOptions } from '../src/index.js';

const store = createMemoryStore();

describe('options', () => {
  it('sets default property values', () => {
    const o = resolveOptions({ store, logger: false });
    expect([...o.methods]).toEqual(['POST', 'PATCH']);
    expect(o).toMatchObject({
      required: true,
      header: 'Idempotency-Key',
      bodyField: 'idempotencyKey',
      ttlMs: 86_400_000,
      leaseMs: 60_000,
      maxBodyBytes: 1_048_576,
      concurrency: 'conflict',
      waitTimeoutMs: 10_000,
      onStoreError: 'fail',
      storeTimeoutMs: 5_000,
      transactional: false,
      fingerprint: 'default',
    });
    expect(o.storable).toBe(defaultStorable);
    expect(Object.isFrozen(o)).toBe(true);
    expect(DEFAULTS.ttlMs).toBe(24 * 60 * 60 * 1000);
  });

  it('treats undefined as not given and upper-cases methods', () => {
    const o = resolveOptions({ store, ttlMs: undefined, methods: ['post', 'put'], logger: false });
    expect(o.ttlMs).toBe(DEFAULTS.ttlMs);
    expect([...o.methods]).toEqual(['POST', 'PUT']);
  });

  it('every option set to undefined resolves as if left out (what `exactOptionalPropertyTypes` users write)', () => {
    const names = ['methods', 'required', 'header', 'bodyField', 'getKey', 'validateKey', 'scope', 'fingerprint', 'storable', 'ttlMs', 'leaseMs', 'maxBodyBytes', 'concurrency', 'waitTimeoutMs', 'onStoreError', 'storeTimeoutMs', 'transactional', 'onEvent', 'logger'] as const;
    const undefinedAll = Object.fromEntries(names.map((name) => [name, undefined])) as Partial<IdempotencyOptions>;
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => undefined);
    try {
      // Functions (the default logger's wrappers) are made per call: compared by kind, not identity.
      const shape = (o: object) => Object.entries(o).map(([k, v]) => [k, typeof v === 'function' ? 'function' : k === 'logger' && v ? Object.keys(v) : v]);
      expect(shape(resolveOptions({ store, ...undefinedAll }))).toEqual(shape(resolveOptions({ store })));
      expect(warn).not.toHaveBeenCalled(); // no "unknown option" for any of them
    } finally {
      warn.mockRestore();
    }
  });

  it.each<[string, Partial<IdempotencyOptions>, RegExp]>([
    ['ttlMs', { ttlMs: 0 }, /ttlMs/],
    ['leaseMs', { leaseMs: 1.5 }, /leaseMs/],
    ['maxBodyBytes', { maxBodyBytes: -1 }, /maxBodyBytes/],
    ['concurrency', { concurrency: 'queue' as 'wait' }, /concurrency/],
    ['onStoreError', { onStoreError: 'ignore' as 'pass' }, /onStoreError/],
    ['header', { header: 'bad header' }, /header/],
    ['bodyField', { bodyField: '' }, /bodyField/],
    ['methods', { methods: 'POST' as unknown as string[] }, /methods/],
    // Before, an empty list was taken, and every request passed unprotected.
    ['methods', { methods: [] }, /`methods` is empty, so no request would be covered/],
    ['scope', { scope: 'user' as unknown as () => string }, /scope/],
    ['fingerprint', { fingerprint: 'sha1' as unknown as false }, /fingerprint/],
    ['transactional', { transactional: true }, /transactional/],
    // Past a Node timer's limit the deadline would fire after 1 ms: every store call a 503.
    ['storeTimeoutMs', { storeTimeoutMs: 2 ** 31 }, /storeTimeoutMs` must be at most 2147483647/],
    ['leaseMs', { leaseMs: 2 ** 31 }, /leaseMs` must be at most/],
    ['waitTimeoutMs', { waitTimeoutMs: 2 ** 31 }, /waitTimeoutMs` must be at most/],
    ['ttlMs', { ttlMs: 0 }, /`ttlMs` must be a positive integer, got 0\./],
    ['ttlMs', { ttlMs: Number.NaN }, /`ttlMs` must be a positive integer, got NaN\./],
    // A number from process.env, left a string: the message shows it is one.
    ['ttlMs', { ttlMs: '1000' as unknown as number }, /`ttlMs` must be a positive integer, got "1000"\./],
    ['required', { required: 'false' as unknown as boolean }, /`required` must be true or false, got "false"/],
    ['transactional', { transactional: 'yes' as unknown as boolean }, /`transactional` must be true or false/],
    // Before, a logger without `warn` and `error` was taken, and every warning vanished.
    ['logger', { logger: console.log as unknown as false }, /`logger` must be false or an object with `warn` and `error`/],
    ['logger', { logger: { warn: () => undefined } as unknown as false }, /`logger`/],
    ['logger', { logger: 'console' as unknown as false }, /`logger`/],
  ])('throws a ConfigurationError naming %s', (_, extra, pattern) => {
    expect(() => resolveOptions({ store, logger: false, ...extra })).toThrow(ConfigurationError);
    expect(() => resolveOptions({ store, logger: false, ...extra })).toThrow(pattern);
  });

  it("accepts a timer's longest delay, and a TTL far beyond it (stores expire records themselves)", () => {
    const o = resolveOptions({ store, logger: false, storeTimeoutMs: 2 ** 31 - 1, leaseMs: 2 ** 31 - 1, ttlMs: 365 * 86_400_000 });
    expect(o.storeTimeoutMs).toBe(2_147_483_647);
    expect(o.ttlMs).toBe(31_536_000_000);
    expect(resolveOptions({ store, logger: false, ttlMs: 3_155_760_000_000 }).ttlMs).toBe(3_155_760_000_000);
  });

  it('caps a longer ttlMs, and Infinity ("forever"), at 100 years: the longest expiry a store can keep as a date', () => {
    for (const ttlMs of [3_155_760_000_001, Number.MAX_SAFE_INTEGER, Number.POSITIVE_INFINITY]) {
      expect(resolveOptions({ store, logger: false, ttlMs }).ttlMs).toBe(3_155_760_000_000);
    }
  });

  it('requires a store that implements the contract', () => {
    expect(() => resolveOptions({} as IdempotencyOptions)).toThrow(/Missing required option `store`/);
    expect(() => resolveOptions({ store: {} } as IdempotencyOptions)).toThrow(/IdempotencyStore/);
    expect(() => resolveOptions(null as unknown as IdempotencyOptions)).toThrow(/object/);
    try {
      resolveOptions({} as IdempotencyOptions);
    } catch (e) {
      expect((e as ConfigurationError).code).toBe('ERR_IDEMKIT_STORE_MISSING');
      expect((e as Error).name).toBe('ConfigurationError');
    }
  });

  it('warns once about unknown options', () => {
    const warn = vi.fn();
    resolveOptions({ store, logger: { warn, error: vi.fn() }, tll: 5 } as IdempotencyOptions);
    expect(warn).toHaveBeenCalledWith(expect.stringContaining('tll'));
  });

  // Was silent: `leaseMs: 10` (meant as seconds) lapsed while its handler ran, and a retry ran it again.
  it('warns when the lease is shorter than the store deadline, and only then', () => {
    const warn = vi.fn();
    const logger = { warn, error: vi.fn() };
    resolveOptions({ store, logger, leaseMs: 10 });
    expect(warn).toHaveBeenCalledTimes(1);
    expect(warn).toHaveBeenCalledWith(expect.stringMatching(/`leaseMs` \(10 ms\) is shorter than `storeTimeoutMs` \(5000 ms\).*second run/));
    resolveOptions({ store, logger, leaseMs: 2_000, storeTimeoutMs: 500 });
    resolveOptions({ store, logger, leaseMs: 5_000 });
    resolveOptions({ store, logger });
    expect(warn).toHaveBeenCalledTimes(1);
  });

  it('default storable: below 500 except 408, 409, 425, 429', () => {
    expect([200, 201, 204, 302, 400, 404, 422].every(defaultStorable)).toBe(true);
    expect([408, 409, 425, 429, 500, 503].some(defaultStorable)).toBe(false);
    // No real answer: a status Node refuses (0), or an interim one.
    expect([0, 99, 100, 101, 199].some(defaultStorable)).toBe(false);
  });
});
