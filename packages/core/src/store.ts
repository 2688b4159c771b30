/**
 * The store contract (SPEC §3). Every adapter implements it and proves it with
 * `@idemkit/store-conformance`. Expected outcomes are values; a thrown error means only
 * that the store is broken (the engine wraps it as `StoreUnavailableError`'s `cause`).
 */

/** Opaque proof of lease ownership. Stores mint it; only the holder may complete/release/renew. */
export type LeaseToken = string & { readonly __brand: 'LeaseToken' };

/** A response as it is stored and replayed: byte-exact body, ordered (possibly repeated) headers. */
export interface StoredResponse {
  readonly status: number;
  /** Lower-case names; a multi-valued header appears once per value, in order. */
  readonly headers: ReadonlyArray<readonly [string, string]>;
  readonly body: Uint8Array;
}

export type RecordState = 'in_progress' | 'completed';

/** One record per scoped key, as a store returns it. Times are epoch ms by the store's clock. */
export interface IdempotencyRecord {
  readonly key: string;
  /** `null` when fingerprinting is disabled. */
  readonly fingerprint: string | null;
  readonly state: RecordState;
  /** When the running holder's lease ends; `null` once completed. */
  readonly leaseExpiresAt: number | null;
  /** The stored response; `null` while in progress. */
  readonly response: StoredResponse | null;
  readonly createdAt: number;
  /** After this instant the record counts as absent (for in-progress records: the lease end). */
  readonly expiresAt: number;
}

export type BeginResult =
  | {
      readonly kind: 'acquired';
      readonly token: LeaseToken;
      /** True when an in-progress record whose lease had expired was taken over. */
      readonly tookOver: boolean;
    }
  | {
      readonly kind: 'existing';
      readonly record: IdempotencyRecord;
      /** Lease time left by the store's clock (0 for completed records); feeds `Retry-After`. */
      readonly leaseRemainingMs: number;
    };

export interface IdempotencyStore {
  /**
   * True when several processes see the same records (a database). The in-memory store says
   * false so the engine can warn when it runs in production.
   */
  readonly shared: boolean;
  /**
   * The largest response this store can keep in one record, when it has such a limit (MongoDB's
   * 16 MiB documents): body bytes plus the UTF-8 bytes of the header names and values. The engine
   * refuses a larger `maxBodyBytes` at setup (an answer the store could not keep would never be
   * stored, and retries would run the handler again), and stores its 410 too-large marker for an
   * answer whose body fits `maxBodyBytes` but whose body and headers together exceed this.
   */
  readonly maxResponseBytes?: number;
  /**
   * Atomically claim `key`: create an `in_progress` record holding a fresh lease token, or return
   * the live record. An in-progress record whose lease has expired is taken over (new token); an
   * expired completed record counts as absent. Exactly one of N concurrent callers gets
   * `acquired`. One round trip; time from the store's clock.
   */
  begin(key: string, fingerprint: string | null, leaseMs: number): Promise<BeginResult>;
  /**
   * Store `response` and mark the record completed, expiring `ttlMs` from now, if and only if
   * `token` still holds the lease. Returns false (never throws) when it does not.
   */
  complete(key: string, token: LeaseToken, response: StoredResponse, ttlMs: number): Promise<boolean>;
  /** Delete the record if `token` holds it. Returns whether it did. */
  release(key: string, token: LeaseToken): Promise<boolean>;
  /** Extend the lease to `leaseMs` from now if `token` holds it. Returns whether it did. */
  renew(key: string, token: LeaseToken, leaseMs: number): Promise<boolean>;
  /** The live record, or undefined when absent or expired. */
  get(key: string): Promise<IdempotencyRecord | undefined>;
  /**
   * Delete up to `limit` expired records (default: a store-chosen batch); returns how many.
   * Stores with native expiry may return 0.
   */
  purgeExpired(limit?: number): Promise<number>;
  /** Release resources this store created. Never closes a caller-owned client. Safe to call twice. */
  close(): Promise<void>;
}

/**
 * An open store transaction for transactional mode: the handler's own writes go through
 * `client`, and `complete` stores the response in the same transaction and commits it, so
 * business writes and the stored response commit or roll back together.
 */
export interface StoreTransaction<Client = unknown> {
  /** The driver client of the open transaction (for Postgres, a `pg` `PoolClient`). */
  readonly client: Client;
  /**
   * Mark the record completed inside the transaction and commit, if `token` still holds the
   * lease. When it does not, the transaction is rolled back (the stale holder's writes vanish)
   * and false is returned. Rejects with `TransactionEndedError` (after giving the connection
   * back, having stored nothing) when the handler ended the transaction itself.
   */
  complete(key: string, token: LeaseToken, response: StoredResponse, ttlMs: number): Promise<boolean>;
  /**
   * Roll back and give the connection back. Safe after `complete`. Rejects with
   * `TransactionEndedError`, once it has cleaned up, when the handler ended the transaction itself.
   */
  rollback(): Promise<void>;
}

/** A store that can run handlers in its own transactions (`transactional: true`). */
export interface TransactionalStore<Client = unknown> extends IdempotencyStore {
  beginTransaction(): Promise<StoreTransaction<Client>>;
}
