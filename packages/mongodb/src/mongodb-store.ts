import { randomUUID } from 'node:crypto';
import { MongoServerError } from 'mongodb';
import type { Collection, Filter } from 'mongodb';
import type { BeginResult, IdempotencyStore, LeaseToken, StoredResponse, IdempotencyRecord } from '@idemkit/core';
import { toRecord, toResponseDocument } from './document.js';
import type { IdempotencyDocument, TakeoverClaimDocument } from './document.js';
import { ServerClock, localClock } from './clock.js';
import type { StoreClock } from './clock.js';
import { createIndexes } from './indexes.js';
import type { IndexOutcome } from './indexes.js';
import { resolveOptions } from './options.js';
import type { MongoStoreOptions, ResolvedMongoStoreOptions } from './options.js';

export interface MongoStore extends IdempotencyStore {
  /** The collection records live in. */
  readonly collection: Collection<IdempotencyDocument>;
  /**
   * Create the TTL index on `expiresAt`. Idempotent; safe on every boot. Resolves 'no-ttl' (after
   * one warning through `logger`) on servers without TTL indexes, e.g. FerretDB v1.
   */
  ensureIndexes(): Promise<IndexOutcome>;
}

/** begin gives up after this many lost races in a row (each loss means another caller made progress). */
const MAX_BEGIN_ATTEMPTS = 16;
const DEFAULT_PURGE_LIMIT = 1000;
const DUPLICATE_KEY = 11000;
/** How long a takeover claim blocks other takers if its owner dies before replacing the record. */
const CLAIM_WINDOW_MS = 10_000;

/** A short, growing pause between lost races (the winner needs one round trip to finish). */
function backoff(attempt: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, Math.min(50, 2 ** attempt)));
}

function assertKey(key: string): void {
  // Keys go into queries as values; a non-string from untyped callers could be an operator object.
  if (typeof key !== 'string') throw new TypeError('[idemkit] [mongodb] key must be a string');
}

function isDuplicateKey(error: unknown): boolean {
  return error instanceof MongoServerError && error.code === DUPLICATE_KEY;
}

function newToken(): LeaseToken {
  return randomUUID() as LeaseToken;
}

class MongoIdempotencyStore implements MongoStore {
  readonly shared = true;
  readonly collection: Collection<IdempotencyDocument>;
  readonly #options: ResolvedMongoStoreOptions;
  readonly #clock: StoreClock;
  #warned = false;

  constructor(options: ResolvedMongoStoreOptions) {
    this.#options = options;
    this.collection = options.collection;
    this.#clock = options.clock === 'server' ? new ServerClock(options.collection.db, options.clockRefreshMs) : localClock;
  }

  /** A filter on the key that can never be read as an operator. */
  #byKey(key: string): Filter<IdempotencyDocument> {
    return { _id: { $eq: key } };
  }

  async begin(key: string, fingerprint: string | null, leaseMs: number): Promise<BeginResult> {
    assertKey(key);
    for (let attempt = 0; attempt < MAX_BEGIN_ATTEMPTS; attempt++) {
      const now = await this.#clock.now();
      const token = newToken();
      const fresh: Omit<IdempotencyDocument, '_id'> = {
        fingerprint,
        state: 'in_progress',
        token,
        leaseExpiresAt: new Date(now + leaseMs),
        response: null,
        createdAt: new Date(now),
        expiresAt: new Date(now + leaseMs),
      };
      let before: IdempotencyDocument | null;
      try {
        // One round trip for both common cases: a new key is inserted ($setOnInsert), an existing
        // one is returned untouched ('before' document). The unique _id makes the insert atomic.
        before = await this.collection.findOneAndUpdate(
          this.#byKey(key),
          { $setOnInsert: fresh },
          { upsert: true, returnDocument: 'before' },
        );
      } catch (error) {
        // Two upserts raced to insert the same _id; the loser retries and now sees the winner.
        if (isDuplicateKey(error)) continue;
        throw error;
      }
      if (before === null) return { kind: 'acquired', token, tookOver: false };
      if (before.expiresAt.getTime() > now) {
        const record = toRecord(before);
        const leaseRemainingMs =
          record.state === 'in_progress' && record.leaseExpiresAt !== null ? Math.max(0, record.leaseExpiresAt - now) : 0;
        return { kind: 'existing', record, leaseRemainingMs };
      }
      // The record is expired (a completed one past its TTL, or a crashed holder's lease). Of
      // several takers one wins the claim and replaces the record only if it is still exactly the
      // one seen; the others back off and see the winner's record. Expired records only.
      if (await this.#claim(key, before, now)) {
        const replaced = await this.collection.updateOne(
          { _id: { $eq: key }, token: { $eq: before.token ?? null }, expiresAt: { $eq: before.expiresAt } },
          { $set: fresh },
        );
        if (replaced.matchedCount === 1) return { kind: 'acquired', token, tookOver: before.state === 'in_progress' };
      }
      await backoff(attempt);
    }
    throw new Error(`[idemkit] [mongodb] begin lost ${MAX_BEGIN_ATTEMPTS} races in a row for one key`);
  }

  /**
   * Insert the takeover claim for this version of the record. Claims are per time window after
   * expiry so a taker that crashed between claim and replace blocks the key for one window at most.
   */
  async #claim(key: string, before: IdempotencyDocument, now: number): Promise<boolean> {
    const window = Math.floor((now - before.expiresAt.getTime()) / CLAIM_WINDOW_MS);
    const claims = this.collection as unknown as Collection<TakeoverClaimDocument>;
    try {
      await claims.insertOne({
        _id: { key, token: before.token ?? null, expiresAt: before.expiresAt, window },
        expiresAt: new Date(now + 2 * CLAIM_WINDOW_MS),
      });
      return true;
    } catch (error) {
      if (isDuplicateKey(error)) return false;
      throw error;
    }
  }

  /** Only a holder whose lease is still running may act; a lapsed lease belongs to whoever takes over. */
  #held(key: string, token: LeaseToken, now: number): Filter<IdempotencyDocument> {
    return { _id: { $eq: key }, token: { $eq: token }, state: 'in_progress', expiresAt: { $gt: new Date(now) } };
  }

  async complete(key: string, token: LeaseToken, response: StoredResponse, ttlMs: number): Promise<boolean> {
    assertKey(key);
    const now = await this.#clock.now();
    const result = await this.collection.updateOne(this.#held(key, token, now), {
      $set: {
        state: 'completed',
        token: null,
        leaseExpiresAt: null,
        response: toResponseDocument(response),
        expiresAt: new Date(now + ttlMs),
      },
    });
    return result.matchedCount === 1;
  }

  async release(key: string, token: LeaseToken): Promise<boolean> {
    assertKey(key);
    const now = await this.#clock.now();
    const result = await this.collection.deleteOne(this.#held(key, token, now));
    return result.deletedCount === 1;
  }

  async renew(key: string, token: LeaseToken, leaseMs: number): Promise<boolean> {
    assertKey(key);
    const now = await this.#clock.now();
    const until = new Date(now + leaseMs);
    const result = await this.collection.updateOne(this.#held(key, token, now), {
      $set: { leaseExpiresAt: until, expiresAt: until },
    });
    return result.matchedCount === 1;
  }

  async get(key: string): Promise<IdempotencyRecord | undefined> {
    assertKey(key);
    const now = await this.#clock.now();
    // Filter on expiry in the query: the TTL monitor runs only every 60 s (and not at all on FerretDB).
    const doc = await this.collection.findOne({ _id: { $eq: key }, expiresAt: { $gt: new Date(now) } });
    return doc === null ? undefined : toRecord(doc);
  }

  async purgeExpired(limit: number = DEFAULT_PURGE_LIMIT): Promise<number> {
    if (!Number.isInteger(limit) || limit <= 0) throw new RangeError('[idemkit] [mongodb] limit must be a positive integer');
    const now = new Date(await this.#clock.now());
    const ids = await this.collection
      .find({ expiresAt: { $lte: now } }, { projection: { _id: 1 }, limit })
      .map((doc) => doc._id)
      .toArray();
    if (ids.length === 0) return 0;
    // Re-check expiry: a record taken over or renewed since the find must survive.
    const result = await this.collection.deleteMany({ _id: { $in: ids }, expiresAt: { $lte: now } });
    return result.deletedCount;
  }

  async ensureIndexes(): Promise<IndexOutcome> {
    const logger = this.#options.logger;
    const warn = logger === false || this.#warned ? undefined : logger;
    const outcome = await createIndexes(this.collection, warn);
    if (outcome === 'no-ttl') this.#warned = true;
    return outcome;
  }

  async close(): Promise<void> {
    // Nothing to release: the client is the caller's, and the clock holds no timers.
  }
}

/**
 * A MongoDB-backed idempotency store on the official driver. Synchronous and side-effect free:
 * call `ensureIndexes()` once at boot for the TTL index.
 */
export function createMongoStore(options: MongoStoreOptions): MongoStore {
  return new MongoIdempotencyStore(resolveOptions(options));
}
