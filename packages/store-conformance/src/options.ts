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
