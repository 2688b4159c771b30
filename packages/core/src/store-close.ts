import type { IdempotencyStore } from './store.js';

/**
 * Whether a store's `close()` has been called, and the background completions to end when it is.
 *
 * A completion the store failed is retried until it lands or the lease runs out, and a job call
 * waits for that (see `idempotent()`). Once the store is closed (a worker shutting down on
 * SIGTERM) no attempt can land, and stores do not say so alike: Redis rejects every call, a
 * Postgres store ends only a pool it created, MongoDB's keeps working on the caller's client.
 * So core watches `close()` itself, for every store, its own or not: the retries end at once
 * instead of holding the call, and the process, until the lease runs out.
 */
export class StoreCloseWatch {
  #closed = false;
  /** Background completions waiting on this store; empty but for a store that failed a completion. */
  readonly #listeners = new Set<() => void>();

  get closed(): boolean {
    return this.#closed;
  }

  /** `listener` runs once, when the store is closed; not if it already is (check `closed` first). */
  add(listener: () => void): void {
    this.#listeners.add(listener);
  }

  delete(listener: () => void): void {
    this.#listeners.delete(listener);
  }

  markClosed(): void {
    if (this.#closed) return;
    this.#closed = true;
    const listeners = [...this.#listeners];
    this.#listeners.clear();
    for (const listener of listeners) listener();
  }
}

/** One watch per store object: engines sharing a store (several jobs, a binding) share it. */
const watches = new WeakMap<object, StoreCloseWatch>();

/**
 * The close watch of `store`, installed on first use (at engine setup, never per request): its
 * `close` is replaced by a Proxy of it whose call marks the watch, then calls the store's own. A store whose
 * `close` cannot be replaced (a frozen object) gets a watch that never fires: its retries end
 * as before, when the lease runs out.
 */
export function watchClose(store: IdempotencyStore): StoreCloseWatch {
  let watch = watches.get(store);
  if (watch) return watch;
  watch = new StoreCloseWatch();
  watches.set(store, watch);
  const own = Object.getOwnPropertyDescriptor(store, 'close');
  const marked = watch;
  // A Proxy of the store's own `close`, not a new function: everything but the call reaches the
  // original, so a test double stays one (`expect(store.close).toHaveBeenCalled()`,
  // `vi.mocked(store.close).mockResolvedValue()` on a `vi.fn()` or `vi.spyOn` made before setup),
  // and its name and length are the store's.
  const close = new Proxy(store.close, {
    apply(target, thisArg, args) {
      marked.markClosed();
      return Reflect.apply(target, thisArg, args) as unknown;
    },
  });
  try {
    // An own `close` keeps its visibility; one from the prototype stays out of Object.keys.
    Object.defineProperty(store, 'close', { value: close, writable: true, enumerable: own?.enumerable ?? false, configurable: true });
  } catch {
    // Frozen or non-configurable: nothing to install.
  }
  return watch;
}
