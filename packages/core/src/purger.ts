import { withDeadline } from './deadline.js';
import { MAX_TIMER_MS } from './options.js';
import type { IdempotencyStore } from './store.js';

export interface PurgerOptions {
  /** Time between sweeps in ms, at most 2_147_483_647 (a Node timer's limit). @default 60_000 */
  intervalMs?: number | undefined;
  /** Records deleted per store call; a sweep repeats calls until a batch comes back short. @default 1_000 */
  batchSize?: number | undefined;
  /**
   * How long one `purgeExpired` call may take, in ms: past it the sweep fails (`onError`), the
   * next sweep may start and `stop()` returns, so a store that never answers (a connection
   * hanging on a dead host) stops neither. @default 30_000
   */
  timeoutMs?: number | undefined;
  /** A failed sweep; the purger keeps going. @default logs with console.error */
  onError?: ((error: unknown) => void) | undefined;
}

export interface Purger {
  /** Sweep now (all batches); resolves to the number of records removed. */
  runOnce(): Promise<number>;
  /** Stop sweeping; waits for a sweep in progress (its current call at most `timeoutMs`). */
  stop(): Promise<void>;
}

/**
 * Periodically remove expired records from stores without native expiry (Postgres, MongoDB
 * without a TTL index, memory). The timer is `unref`'d so it never keeps a process alive.
 */
export function startPurger(store: IdempotencyStore, options: PurgerOptions = {}): Purger {
  // Checked here: a missing store (or `startPurger({ store, intervalMs })`) failed every sweep,
  // a log line a minute, while expired records piled up.
  if (typeof (store as Partial<IdempotencyStore> | null | undefined)?.purgeExpired !== 'function') {
    throw new TypeError('[idemkit] startPurger(store, options): `store` must be an idempotency store (with `purgeExpired`), e.g. `startPurger(store, { intervalMs: 60_000 })`.');
  }
  if (typeof options !== 'object' || options === null) throw new TypeError('[idemkit] startPurger: `options` must be an object (or left out).');
  const intervalMs = options.intervalMs ?? 60_000;
  const batchSize = options.batchSize ?? 1_000;
  const timeoutMs = options.timeoutMs ?? 30_000;
  const onError = options.onError ?? ((error: unknown) => console.error('[idemkit] purgeExpired failed', error));
  if (!Number.isSafeInteger(intervalMs) || intervalMs <= 0) throw new TypeError('[idemkit] startPurger: `intervalMs` must be a positive integer.');
  // setInterval fires after 1 ms instead of a longer delay: the store would be swept a thousand times a second.
  if (intervalMs > MAX_TIMER_MS) throw new TypeError(`[idemkit] startPurger: \`intervalMs\` must be at most ${MAX_TIMER_MS} ms (a Node timer's limit), got ${intervalMs}.`);
  if (!Number.isSafeInteger(batchSize) || batchSize <= 0) throw new TypeError('[idemkit] startPurger: `batchSize` must be a positive integer.');
  if (!Number.isSafeInteger(timeoutMs) || timeoutMs <= 0 || timeoutMs > MAX_TIMER_MS) {
    throw new TypeError(`[idemkit] startPurger: \`timeoutMs\` must be a positive integer, at most ${MAX_TIMER_MS} ms (a Node timer's limit).`);
  }
  // `.catch()` of a non-function passes the failure on: an unhandled rejection that ends the process.
  if (typeof onError !== 'function') throw new TypeError('[idemkit] startPurger: `onError` must be a function.');

  let running: Promise<number> | undefined;
  let stopped = false;

  const sweep = async (): Promise<number> => {
    let total = 0;
    for (;;) {
      // Without a deadline a hung call held `running` for good: no later sweep, and stop() never returned.
      const n: unknown = await withDeadline('purgeExpired', timeoutMs, () => store.purgeExpired(batchSize));
      // Anything but a count (a custom store that resolves to nothing) would never come back
      // "short", and the sweep would call the store in a loop for good.
      if (typeof n !== 'number' || !(n >= 0)) throw new TypeError(`[idemkit] startPurger: the store's purgeExpired() must resolve to the number of records removed, not ${String(n)}.`);
      total += n;
      if (n < batchSize || stopped) return total;
    }
  };
  const runOnce = (): Promise<number> => {
    // One sweep at a time: a slow sweep is joined, not doubled.
    running ??= sweep().finally(() => {
      running = undefined;
    });
    return running;
  };
  const timer = setInterval(() => {
    // A throwing onError (a log transport that is down) must not become an unhandled rejection,
    // which ends the process: the purger keeps going, as it does after a failed sweep.
    runOnce()
      .catch(onError)
      .catch(() => undefined);
  }, intervalMs);
  timer.unref();

  return {
    runOnce,
    async stop() {
      stopped = true;
      clearInterval(timer);
      await running?.catch(() => undefined);
    },
  };
}
