import type { Collection, IndexDescriptionInfo } from 'mongodb';
import { ConfigurationError } from '@idemkit/core';
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
 * IndexOptionsConflict (an index on the same key under another name, or this name with other
 * options) and IndexKeySpecsConflict (this name on another key): both come back at every boot
 * until someone changes the indexes, so they are a configuration error, not a driver failure.
 */
const CLASH_CODES = new Set([85, 86]);

function describe(index: IndexDescriptionInfo): string {
  const ttl = index.expireAfterSeconds === undefined ? 'no TTL' : `TTL expireAfterSeconds: ${index.expireAfterSeconds}`;
  const extra = [
    index.unique === true ? 'unique' : undefined,
    index.sparse === true ? 'sparse' : undefined,
    index.partialFilterExpression === undefined ? undefined : `partialFilterExpression: ${JSON.stringify(index.partialFilterExpression)}`,
  ].filter((option) => option !== undefined);
  return `"${index.name}" on ${JSON.stringify(index.key)} (${[ttl, ...extra].join(', ')})`;
}

/**
 * Why the index the server now has under the store's name is not the one asked for, or
 * undefined when it is. FerretDB v1 answers ok to a createIndex whose name and key match an
 * existing index's and keeps that index with its own options (MongoDB refuses it, code 85); a
 * unique one made every completion that met another record's expiry instant fail, and a TTL or
 * partial one deletes records early or not at all.
 */
function mismatch(index: IndexDescriptionInfo | undefined, ttl: boolean): string | undefined {
  if (index === undefined) return 'it is not listed';
  if (JSON.stringify(index.key) !== JSON.stringify({ expiresAt: 1 })) return 'its key differs';
  if (index.unique === true) return 'it is unique (two records may expire at the same instant)';
  if (index.partialFilterExpression !== undefined) return 'it is partial';
  const seconds = index.expireAfterSeconds === undefined ? undefined : Number(index.expireAfterSeconds);
  if (ttl ? seconds !== 0 : seconds !== undefined) return 'its TTL differs';
  return undefined;
}

/** Name the index in the way and say what to do about it (as the Postgres store's migrate() does). */
async function indexClash(
  collection: Collection<IdempotencyDocument>,
  name: string,
  ttl: boolean,
  error: unknown,
): Promise<ConfigurationError> {
  const wanted = `"${name}" on {"expiresAt":1}${ttl ? ' (TTL expireAfterSeconds: 0)' : ''}`;
  const code = `server code ${String(errorCode(error))}: ${(error as Error).message}`;
  const indexes = await collection.indexes().catch(() => [] as IndexDescriptionInfo[]);
  const sameName = indexes.find((index) => index.name === name);
  const sameKey = indexes.find(
    (index) => index.name !== name && JSON.stringify(index.key) === JSON.stringify({ expiresAt: 1 }),
  );
  const ns = collection.namespace;
  const drop = (other: string) => `db.collection(${JSON.stringify(collection.collectionName)}).dropIndex(${JSON.stringify(other)})`;
  let message: string;
  if (sameKey !== undefined) {
    message =
      `ensureIndexes(): ${ns} already has an index on expiresAt, ${describe(sameKey)}, so ${wanted} cannot be created ` +
      `beside it (${code}). Either drop it (${drop(String(sameKey.name))}) and call ensureIndexes() again, or keep it: ` +
      'any ascending index on expiresAt serves the store (reads check expiry themselves), so create your indexes ' +
      'in your own migrations and stop calling ensureIndexes()' +
      (sameKey.expireAfterSeconds === undefined ? '; without a TTL nothing deletes expired records, so call store.purgeExpired() periodically.' : '.');
  } else if (sameName !== undefined) {
    message =
      `ensureIndexes(): ${ns} has an index ${describe(sameName)}, not ${wanted} as the store creates it (${code}). ` +
      `Drop it (${drop(name)}) and call ensureIndexes() again.`;
  } else {
    message = `ensureIndexes(): ${ns} has an index that clashes with ${wanted} (${code}). Drop it and call ensureIndexes() again.`;
  }
  return new ConfigurationError('ERR_IDEMKIT_STORE_INDEX', `[mongodb] ${message}`);
}

async function createExpiryIndex(collection: Collection<IdempotencyDocument>, name: string, ttl: boolean): Promise<void> {
  try {
    await collection.createIndex({ expiresAt: 1 }, ttl ? { name, expireAfterSeconds: 0 } : { name });
  } catch (error) {
    if (CLASH_CODES.has(errorCode(error) as number)) throw await indexClash(collection, name, ttl, error);
    throw error;
  }
  // The server said ok: check that the index under this name is the one asked for (one more
  // round trip, at boot only).
  const index = (await collection.indexes()).find((i) => i.name === name);
  const wrong = mismatch(index, ttl);
  if (wrong === undefined) return;
  const wanted = `"${name}" on {"expiresAt":1}${ttl ? ' (TTL expireAfterSeconds: 0)' : ' (no TTL)'}`;
  const drop = `db.collection(${JSON.stringify(collection.collectionName)}).dropIndex(${JSON.stringify(name)})`;
  throw new ConfigurationError(
    'ERR_IDEMKIT_STORE_INDEX',
    `[mongodb] ensureIndexes(): ${collection.namespace} has an index ${index === undefined ? `"${name}"` : describe(index)}, not ${wanted} ` +
      `as the store creates it, and the server kept it (${wrong}). Drop it (${drop}) and call ensureIndexes() again.`,
  );
}

/**
 * Create the TTL index on `expiresAt` (housekeeping only: reads filter on `expiresAt` anyway).
 * A server that refuses TTL indexes gets a plain index instead, so `purgeExpired` stays cheap,
 * and one warning. An index in the way (same key under another name, or this name on another
 * key) is a ConfigurationError that names it: the driver's error came back at every boot.
 */
export async function createIndexes(
  collection: Collection<IdempotencyDocument>,
  warn: Pick<IdempotencyLogger, 'warn'> | undefined,
): Promise<IndexOutcome> {
  try {
    await createExpiryIndex(collection, TTL_INDEX_NAME, true);
    return 'ttl';
  } catch (error) {
    if (!UNSUPPORTED_CODES.has(errorCode(error) as number)) throw error;
    await createExpiryIndex(collection, PLAIN_INDEX_NAME, false);
    warn?.warn(
      `[idemkit] [mongodb] The server refused a TTL index on ${collection.namespace}.expiresAt ` +
        `(${(error as Error).message}). Expired records are still treated as absent on read, ` +
        'but only store.purgeExpired() deletes them: run it periodically, e.g. startPurger(store) from @idemkit/core (once a minute). ' +
        'An app that already does can ignore this.',
    );
    return 'no-ttl';
  }
}
