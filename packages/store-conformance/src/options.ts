import type { IdempotencyStore } from '@idemkit/core';

/** How a store wires itself into `runStoreConformance`. */
export interface StoreConformanceOptions {
  /** Shown in test titles. */
  name: string;
  /** A store for the suite; may be called several times (e.g. once per describe). May share one client. */
  createStore: () => IdempotencyStore | Promise<IdempotencyStore>;
  /** Optional: a store built on a SECOND, independent client/connection to the same backend, for cross-client races. */
  createSecondStore?: () => IdempotencyStore | Promise<IdempotencyStore>;
  /** Runs after the whole suite: end pools, quit clients, drop schemas. */
  cleanup?: () => Promise<void>;
  /**
   * The backend deletes expired records by itself (Redis key expiry), so `purgeExpired` may find
   * nothing to delete. The purge clause then checks that expired records are gone via `get()` and
   * that `purgeExpired` returns a count >= 0, instead of exact batch counts.
   */
  nativeExpiry?: boolean;
  /**
   * The store's clock IS this process's clock (the in-memory store). Every other store dates
   * leases, TTLs and purges by its backend's clock (SPEC §3), which the `clock` clause proves by
   * setting this process's clock an hour off; `processClock: true` skips that clause.
   */
  processClock?: boolean;
}

const KNOWN = ['name', 'createStore', 'createSecondStore', 'cleanup', 'nativeExpiry', 'processClock'];

/**
 * Options a typo would turn into a silently weaker run (`createSecondstore` skips the two-client
 * races, `nativeexpiry` makes the purge clause demand counts Redis cannot give) are refused, as
 * are options of the wrong kind: the test file fails at once, naming the option.
 */
export function checkOptions(options: StoreConformanceOptions): void {
  if (typeof options !== 'object' || options === null) throw new TypeError('[idemkit] runStoreConformance: pass an options object: { name, createStore }.');
  const unknown = Object.keys(options).filter((name) => !KNOWN.includes(name));
  if (unknown.length > 0) throw new TypeError(`[idemkit] runStoreConformance: unknown option(s) ${unknown.map((name) => `\`${name}\``).join(', ')}; the options are ${KNOWN.join(', ')}.`);
  if (typeof options.name !== 'string' || options.name === '') throw new TypeError('[idemkit] runStoreConformance: `name` must be a non-empty string.');
  if (typeof options.createStore !== 'function') throw new TypeError('[idemkit] runStoreConformance: `createStore` must be a function that returns a store.');
  for (const name of ['createSecondStore', 'cleanup'] as const) {
    if (options[name] !== undefined && typeof options[name] !== 'function') throw new TypeError(`[idemkit] runStoreConformance: \`${name}\` must be a function.`);
  }
  for (const name of ['nativeExpiry', 'processClock'] as const) {
    if (options[name] !== undefined && typeof options[name] !== 'boolean') throw new TypeError(`[idemkit] runStoreConformance: \`${name}\` must be true or false.`);
  }
}
