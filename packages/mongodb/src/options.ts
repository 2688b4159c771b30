import { ConfigurationError } from '@idemkit/core';
import type { IdempotencyLogger } from '@idemkit/core';
import type { Collection, Db } from 'mongodb';
import type { IdempotencyDocument } from './document.js';

/** Where the records live: your own Collection, or a Db plus a collection name. */
export type MongoStoreTarget =
  | {
      /** A collection you own. idemkit never closes its client. */
      readonly collection: Collection<IdempotencyDocument>;
    }
  | {
      /** A database you own. idemkit never closes its client. */
      readonly db: Db;
      /** @default 'idempotency_keys' */
      readonly collectionName?: string | undefined;
    };

export type MongoStoreOptions = MongoStoreTarget & {
  /**
   * Which clock decides leases and expiry. 'server' estimates the MongoDB server's clock from
   * `hello.localTime` (precision ± half a round trip), so app servers with skewed clocks agree;
   * 'local' uses this process's `Date.now()`. @default 'server'
   */
  readonly clock?: 'server' | 'local' | undefined;
  /** How often the server-clock offset is re-measured, in ms (in the background). @default 60_000 */
  readonly clockRefreshMs?: number | undefined;
  /**
   * How conditional writes are made atomic. 'native': one atomic document update per operation
   * (MongoDB). 'claims': each lease-ending write first inserts a unique claim, for servers whose
   * updates are not atomic compare-and-set (FerretDB v1); costs an extra round trip or two.
   * 'auto' asks `buildInfo` once and picks 'claims' on FerretDB, else 'native' (also when the
   * server refuses `buildInfo` under the Stable API's strict mode, as MongoDB does). @default 'auto'
   */
  readonly fencing?: 'auto' | 'native' | 'claims' | undefined;
  /** Where the one-time "TTL indexes unsupported" warning goes. false silences it. @default console */
  readonly logger?: Pick<IdempotencyLogger, 'warn'> | false | undefined;
};

export const DEFAULTS = Object.freeze({
  collectionName: 'idempotency_keys',
  clock: 'server',
  clockRefreshMs: 60_000,
  fencing: 'auto',
} as const);

export interface ResolvedMongoStoreOptions {
  readonly collection: Collection<IdempotencyDocument>;
  readonly clock: 'server' | 'local';
  readonly clockRefreshMs: number;
  readonly fencing: 'auto' | 'native' | 'claims';
  readonly logger: Pick<IdempotencyLogger, 'warn'> | false;
}

const KNOWN = new Set(['collection', 'db', 'collectionName', 'clock', 'clockRefreshMs', 'fencing', 'logger']);

function invalid(message: string): ConfigurationError {
  return new ConfigurationError('ERR_IDEMKIT_STORE_OPTIONS', `[mongodb] ${message}`);
}

/** Validate up front and name the offending option (never at first use). */
export function resolveOptions(options: MongoStoreOptions): ResolvedMongoStoreOptions {
  if (options === null || typeof options !== 'object') {
    throw invalid('Options are required: createMongoStore({ collection }) or createMongoStore({ db }).');
  }
  const hasCollection = 'collection' in options && options.collection !== undefined;
  const hasDb = 'db' in options && options.db !== undefined;
  if (hasCollection === hasDb) {
    throw invalid('Pass exactly one of `collection` or `db`.');
  }
  if (hasCollection && (options as { collectionName?: unknown }).collectionName !== undefined) {
    throw invalid('`collectionName` applies only with `db`: with `collection`, the collection is the one given.');
  }
  let collection: Collection<IdempotencyDocument>;
  if ('collection' in options && options.collection !== undefined) {
    if (typeof options.collection.findOneAndUpdate !== 'function') {
      throw invalid('`collection` must be a mongodb Collection.');
    }
    collection = options.collection;
  } else {
    const { db, collectionName = DEFAULTS.collectionName } = options as { db: Db; collectionName?: string };
    if (typeof db.collection !== 'function') throw invalid('`db` must be a mongodb Db.');
    if (typeof collectionName !== 'string' || collectionName === '') {
      throw invalid('`collectionName` must be a non-empty string.');
    }
    collection = db.collection<IdempotencyDocument>(collectionName);
  }
  const clock = options.clock ?? DEFAULTS.clock;
  if (clock !== 'server' && clock !== 'local') throw invalid("`clock` must be 'server' or 'local'.");
  const clockRefreshMs = options.clockRefreshMs ?? DEFAULTS.clockRefreshMs;
  if (!Number.isFinite(clockRefreshMs) || clockRefreshMs <= 0) {
    throw invalid('`clockRefreshMs` must be a positive number of milliseconds.');
  }
  const fencing = options.fencing ?? DEFAULTS.fencing;
  if (fencing !== 'auto' && fencing !== 'native' && fencing !== 'claims') {
    throw invalid("`fencing` must be 'auto', 'native' or 'claims'.");
  }
  const logger = options.logger === undefined ? console : options.logger;
  const unknown = Object.keys(options).filter((name) => !KNOWN.has(name));
  // A misspelt option (`collection_name`) would silently keep the default.
  if (unknown.length > 0 && logger) logger.warn(`[idemkit] [mongodb] Unknown option(s) ignored: ${unknown.join(', ')}.`);
  return Object.freeze({ collection, clock, clockRefreshMs, fencing, logger });
}
