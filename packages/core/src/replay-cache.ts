import type { StoredResponse } from './store.js';

/** One completed answer kept in process. */
export interface CachedAnswer {
  readonly fingerprint: string | null;
  readonly response: StoredResponse;
  /** When it stops being replayed from here, by `performance.now()`. */
  readonly until: number;
}

/**
 * Completed answers kept in this process (the `localCache` option), so a retry storm on one key
 * costs the store nothing. A completed record never changes until it expires, so a copy is as
 * true as the store's, for as long as it lives: at most `maxAgeMs`, never past the record's own
 * expiry. Full, it drops its oldest entry: a `Map` keeps insertion order, so that is the first key.
 */
export class ReplayCache {
  readonly #entries = new Map<string, CachedAnswer>();

  constructor(
    private readonly maxEntries: number,
    private readonly maxAgeMs: number,
  ) {}

  get(id: string): CachedAnswer | undefined {
    const entry = this.#entries.get(id);
    if (entry === undefined || entry.until > performance.now()) return entry;
    this.#entries.delete(id);
    return undefined;
  }

  /** `expiresInMs`: what is left of the record's own time to live. */
  set(id: string, fingerprint: string | null, response: StoredResponse, expiresInMs: number): void {
    const lifeMs = Math.min(this.maxAgeMs, expiresInMs);
    if (!(lifeMs > 0)) return;
    if (!this.#entries.delete(id) && this.#entries.size >= this.maxEntries) {
      const oldest = this.#entries.keys().next();
      if (!oldest.done) this.#entries.delete(oldest.value);
    }
    this.#entries.set(id, { fingerprint, response, until: performance.now() + lifeMs });
  }
}
