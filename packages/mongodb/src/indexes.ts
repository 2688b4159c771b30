import type { Collection } from 'mongodb';
import type { IdempotencyLogger } from '@idemkit/core';
import type { IdempotencyDocument } from './document.js';

export const TTL_INDEX_NAME = 'idemkit_expiresAt_ttl';
export const PLAIN_INDEX_NAME = 'idemkit_expiresAt';

/** MongoDB's "NotImplemented" (FerretDB v1 for `expireAfterSeconds`) and "CommandNotSupported". */
const UNSUPPORTED_CODES = new Set([238, 115]);

function errorCode(error: unknown): unknown {
  return typeof error === 'object' && error !== null && 'code' in error ? error.code : undefined;
}

export type IndexOutcome = 'ttl' | 'no-ttl';

/**
 * Create the TTL index on `expiresAt` (housekeeping only: reads filter on `expiresAt` anyway).
 * A server that refuses TTL indexes gets a plain index instead, so `purgeExpired` stays cheap,
 * and one warning.
 */
export async function createIndexes(
  collection: Collection<IdempotencyDocument>,
  warn: Pick<IdempotencyLogger, 'warn'> | undefined,
): Promise<IndexOutcome> {
  try {
    await collection.createIndex({ expiresAt: 1 }, { name: TTL_INDEX_NAME, expireAfterSeconds: 0 });
    return 'ttl';
  } catch (error) {
    if (!UNSUPPORTED_CODES.has(errorCode(error) as number)) throw error;
    await collection.createIndex({ expiresAt: 1 }, { name: PLAIN_INDEX_NAME });
    warn?.warn(
      `[idemkit] [mongodb] The server refused a TTL index on ${collection.namespace}.expiresAt ` +
        `(${(error as Error).message}). Expired records are still treated as absent on read, ` +
        'but nothing deletes them: call store.purgeExpired() periodically (e.g. every minute).',
    );
    return 'no-ttl';
  }
}
