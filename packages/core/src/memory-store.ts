import { randomUUID } from 'node:crypto';
import type { BeginResult, IdempotencyRecord, IdempotencyStore, LeaseToken, StoredResponse } from './store.js';
import { brandErrorClasses } from './error-brand.js';
import { handedOut, keptCopy } from './response-copy.js';

export interface MemoryStoreOptions {
  /** Most records kept; when full, the oldest expired or completed records go (1% at a time), never running leases. @default 10_000 */
  maxEntries?: number | undefined;
  /** Clock in epoch ms (tests inject one). @default Date.now */
  now?: (() => number) | undefined;
}

interface Entry {
  fingerprint: string | null;
  state: 'in_progress' | 'completed';
  token: LeaseToken;
  leaseExpiresAt: number;
  response: StoredResponse | null;
  createdAt: number;
  expiresAt: number;
}

/** Thrown by `begin` when every slot holds a running lease: answering 503 beats forgetting a lease. */
export class MemoryStoreFullError extends Error {
  override readonly name = 'MemoryStoreFullError';
}
brandErrorClasses(MemoryStoreFullError);

/**
 * Records in this process's memory: for tests and single-process apps. Not shared between
 * processes (`shared: false`), so the engine warns when it runs with NODE_ENV=production.
 */
export class MemoryStore implements IdempotencyStore {
  readonly shared = false;
  readonly #entries = new Map<string, Entry>();
  readonly #max: number;
  readonly #now: () => number;
  #nextSweepAt = 0;
  /** No record expires before this: a lower bound, lowered on every write, exact after a full pass. */
  #earliestExpiry = Infinity;
  // A token fences one lease, so it must never repeat within this store; it is no secret (code in
  // this process can read the store anyway). A counter is cheaper than a random UUID per begin.
  readonly #tokenPrefix = `${randomUUID()}:`;
  #tokenSeq = 0;
  /**
   * Set by close(): every later call rejects, as a closed Redis store's does. Before, close() only
   * emptied the map and the store went on: a duplicate waiting on a running call claimed the
   * emptied key at its next look and ran fn beside it.
   */
  #closed = false;

  constructor(options: MemoryStoreOptions = {}) {
    const unknown = Object.keys(options).filter((name) => name !== 'maxEntries' && name !== 'now');
    // A misspelt option (`maxEntry`) would silently keep the default.
    if (unknown.length > 0) console.warn(`[idemkit] [memory] Unknown option(s) ignored: ${unknown.join(', ')}.`);
    const max = options.maxEntries ?? 10_000;
    if (!Number.isSafeInteger(max) || max <= 0) throw new TypeError('[idemkit] [memory] `maxEntries` must be a positive integer.');
    this.#max = max;
    // Checked here: a clock that is not a function (`now: Date.now()`) failed every `begin`, a 503 per request.
    if (options.now !== undefined && typeof options.now !== 'function') throw new TypeError('[idemkit] [memory] `now` must be a function returning epoch ms (e.g. `() => Date.now()`).');
    this.#now = options.now ?? Date.now;
  }

  /** Records held right now, expired ones included until they are evicted. */
  get size(): number {
    return this.#entries.size;
  }

  async begin(key: string, fingerprint: string | null, leaseMs: number): Promise<BeginResult> {
    this.#open();
    const now = this.#now();
    const existing = this.#entries.get(key);
    if (existing && existing.expiresAt > now) {
      return {
        kind: 'existing',
        record: toRecord(key, existing),
        leaseRemainingMs: existing.state === 'in_progress' ? existing.leaseExpiresAt - now : 0,
      };
    }
    const tookOver = existing?.state === 'in_progress';
    if (existing) this.#entries.delete(key);
    else {
      // At most once a second: iterating a Map from its head walks the holes its deletions left.
      if (now >= this.#nextSweepAt) {
        this.#nextSweepAt = now + 1_000;
        this.#sweepHead(now);
      }
      this.#makeRoom(now);
    }
    const token = `${this.#tokenPrefix}${++this.#tokenSeq}` as LeaseToken;
    const leaseExpiresAt = now + leaseMs;
    if (leaseExpiresAt < this.#earliestExpiry) this.#earliestExpiry = leaseExpiresAt;
    this.#entries.set(key, { fingerprint, state: 'in_progress', token, leaseExpiresAt, response: null, createdAt: now, expiresAt: leaseExpiresAt });
    return { kind: 'acquired', token, tookOver };
  }

  async complete(key: string, token: LeaseToken, response: StoredResponse, ttlMs: number): Promise<boolean> {
    this.#open();
    const now = this.#now();
    const entry = this.#held(key, token, now);
    if (!entry) return false;
    entry.state = 'completed';
    entry.response = keptCopy(response);
    entry.expiresAt = now + ttlMs;
    if (entry.expiresAt < this.#earliestExpiry) this.#earliestExpiry = entry.expiresAt;
    return true;
  }

  async release(key: string, token: LeaseToken): Promise<boolean> {
    this.#open();
    if (!this.#held(key, token, this.#now())) return false;
    return this.#entries.delete(key);
  }

  async renew(key: string, token: LeaseToken, leaseMs: number): Promise<boolean> {
    this.#open();
    const now = this.#now();
    const entry = this.#held(key, token, now);
    if (!entry) return false;
    entry.leaseExpiresAt = entry.expiresAt = now + leaseMs;
    if (entry.expiresAt < this.#earliestExpiry) this.#earliestExpiry = entry.expiresAt;
    return true;
  }

  async get(key: string): Promise<IdempotencyRecord | undefined> {
    this.#open();
    const entry = this.#entries.get(key);
    if (!entry) return undefined;
    if (entry.expiresAt <= this.#now()) {
      // An expired lease stays until taken over, so `begin` can report the takeover.
      if (entry.state === 'completed') this.#entries.delete(key);
      return undefined;
    }
    return toRecord(key, entry);
  }

  async purgeExpired(limit = 1000): Promise<number> {
    this.#open();
    const now = this.#now();
    let removed = 0;
    for (const [key, entry] of this.#entries) {
      if (removed >= limit) break;
      if (entry.expiresAt <= now) {
        this.#entries.delete(key);
        removed++;
      }
    }
    return removed;
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#entries.clear();
  }

  #open(): void {
    if (this.#closed) throw new Error('[idemkit] [memory] The store is closed.');
  }

  /** The entry if `token` holds a live lease on it. */
  #held(key: string, token: LeaseToken, now: number): Entry | undefined {
    const entry = this.#entries.get(key);
    if (!entry || entry.token !== token || entry.state !== 'in_progress' || entry.leaseExpiresAt <= now) return undefined;
    return entry;
  }

  /**
   * Expired records go first, wherever they are (with several TTLs they are not all at the head),
   * then the oldest completed ones from the head of the Map; running leases never. The pass over
   * expired records runs only once something can have expired (`#earliestExpiry`), so a full store
   * of live records pays for it about once per lease length. A batch of 1% is freed so the next
   * inserts do not search at all (a full scan per insert made a full store 3x slower, found by
   * `pnpm bench`).
   */
  #makeRoom(now: number): void {
    if (this.#entries.size < this.#max) return;
    const target = this.#max - Math.max(1, Math.floor(this.#max / 100));
    if (now >= this.#earliestExpiry) {
      let earliest = Infinity;
      for (const [key, entry] of this.#entries) {
        if (entry.expiresAt <= now) this.#entries.delete(key);
        else if (entry.expiresAt < earliest) earliest = entry.expiresAt;
      }
      this.#earliestExpiry = earliest;
    }
    for (const [key, entry] of this.#entries) {
      if (this.#entries.size <= target) break;
      if (entry.state === 'completed') this.#entries.delete(key);
    }
    if (this.#entries.size >= this.#max) {
      throw new MemoryStoreFullError(`[idemkit] [memory] All ${this.#max} entries hold running leases; raise \`maxEntries\`.`);
    }
  }

  /** Drop expired records from the head (a bounded batch), so they do not linger until full. */
  #sweepHead(now: number): void {
    let budget = 256;
    for (const [key, entry] of this.#entries) {
      if (budget-- === 0 || entry.expiresAt > now) return;
      this.#entries.delete(key);
    }
  }
}

function toRecord(key: string, e: Entry): IdempotencyRecord {
  return {
    key,
    fingerprint: e.fingerprint,
    state: e.state,
    leaseExpiresAt: e.state === 'in_progress' ? e.leaseExpiresAt : null,
    response: e.response && handedOut(e.response),
    createdAt: e.createdAt,
    expiresAt: e.expiresAt,
  };
}

/** An in-memory store (single process). */
export function createMemoryStore(options?: MemoryStoreOptions): MemoryStore {
  return new MemoryStore(options);
}
