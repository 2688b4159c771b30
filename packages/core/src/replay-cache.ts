import { handedOut, keptCopy } from './response-copy.js';
import type { StoredResponse } from './store.js';

/** One completed answer kept in process. */
export interface CachedAnswer {
  readonly fingerprint: string | null;
  readonly response: StoredResponse;
  /** When it stops being replayed from here, by `performance.now()`. */
  readonly until: number;
}

/** What bounds the cache (the `localCache` option, resolved). */
export interface ReplayCacheLimits {
  readonly maxEntries: number;
  readonly maxAgeMs: number;
  readonly maxEntryBytes: number;
}

/**
 * Completed answers kept in this process (the `localCache` option), so a retry storm on one key
 * costs the store nothing. A completed record never changes until it expires, so a copy is as
 * true as the store's while it lives: at most `maxAgeMs`, and never past the record's expiry as
 * the caller works it out. Full, it drops the answer replayed least recently: a `Map` keeps
 * insertion order and a hit moves its entry to the end, so that is the first key.
 */
export class ReplayCache {
  readonly #entries = new Map<string, CachedAnswer>();

  constructor(private readonly limits: ReplayCacheLimits) {}

  get maxAgeMs(): number {
    return this.limits.maxAgeMs;
  }

  /** The kept answer, with a body of its own (a caller may change the bytes it gets). */
  get(id: string): CachedAnswer | undefined {
    const entry = this.#entries.get(id);
    if (entry === undefined) return undefined;
    this.#entries.delete(id);
    if (entry.until <= performance.now()) return undefined;
    this.#entries.set(id, entry);
    return { fingerprint: entry.fingerprint, response: handedOut(entry.response), until: entry.until };
  }

  /** Keep a copy for `lifeMs` at most (capped at `maxAgeMs`); answers over `maxEntryBytes` are not kept. */
  set(id: string, fingerprint: string | null, response: StoredResponse, lifeMs: number): void {
    const life = Math.min(this.limits.maxAgeMs, lifeMs);
    if (!(life > 0) || entrySize(response) > this.limits.maxEntryBytes) return;
    if (!this.#entries.delete(id) && this.#entries.size >= this.limits.maxEntries) {
      const oldest = this.#entries.keys().next();
      if (!oldest.done) this.#entries.delete(oldest.value);
    }
    this.#entries.set(id, { fingerprint, response: keptCopy(response), until: performance.now() + life });
  }
}

/**
 * The body's bytes and the headers' characters: headers are kept too (a handler's large cookie
 * or a long `Link` list), so counting the body alone let `maxEntries` answers hold far more
 * memory than `maxEntries × maxEntryBytes`.
 */
function entrySize(response: StoredResponse): number {
  let size = response.body.byteLength;
  for (const [name, value] of response.headers) size += name.length + value.length;
  return size;
}
