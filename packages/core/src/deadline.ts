import { brandErrorClasses } from './error-brand.js';
import { MemoryStore } from './memory-store.js';
import type { IdempotencyStore } from './store.js';

/** A store call that did not answer within `storeTimeoutMs`. Becomes the `cause` of a 503. */
export class StoreTimeoutError extends Error {
  override readonly name = 'StoreTimeoutError';
  constructor(operation: string, ms: number) {
    super(`[idemkit] Store operation \`${operation}\` did not answer within ${ms} ms.`);
  }
}
brandErrorClasses(StoreTimeoutError);

/**
 * Race a store call against a deadline, so a hung store never hangs a request (SPEC §2: 503).
 * Hand-rolled instead of Promise.race: every request pays this twice, and it allocates less.
 */
export function withDeadline<T>(operation: string, ms: number, call: () => Promise<T>): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(new StoreTimeoutError(operation, ms)), ms);
    timer.unref();
    const settle = (fn: () => void) => {
      clearTimeout(timer);
      fn();
    };
    try {
      call().then(
        (value) => settle(() => resolve(value)),
        (error: unknown) => settle(() => reject(error)),
      );
    } catch (error) {
      // A store method that throws synchronously fails like one that rejects.
      settle(() => reject(error));
    }
  });
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** How the engine and its leases call the store: each operation under the store deadline. */
export type StoreCall = <T>(operation: string, call: () => Promise<T>) => Promise<T>;

/**
 * The store deadline for `store`. Core's own memory store answers within the call and cannot
 * hang, so it skips the timer and the wrapping promise (two per request, seen in `pnpm bench`).
 * A subclass, or an instance with a method replaced (as tests do to simulate a slow store), gets
 * the deadline like any other store.
 */
export function storeCaller(store: IdempotencyStore, ms: number): StoreCall {
  const bounded = <T>(operation: string, call: () => Promise<T>): Promise<T> => withDeadline(operation, ms, call);
  if (Object.getPrototypeOf(store) !== MemoryStore.prototype) return bounded;
  return <T>(operation: string, call: () => Promise<T>): Promise<T> => {
    if (Object.hasOwn(store, operation)) return bounded(operation, call);
    try {
      return call();
    } catch (error) {
      return Promise.reject(error as Error);
    }
  };
}
