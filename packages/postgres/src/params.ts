import { createHash } from 'node:crypto';
import type { LeaseToken, StoredResponse } from '@idemkit/core';

/**
 * Longest key (UTF-8 bytes) kept as it is in the `key` column. A primary-key entry holds at most
 * 2704 bytes (btree), so a longer scoped key (a long `scope` such as a bearer token) could not be
 * stored at all: every request of that tenant failed as a store error (503, or run without
 * idempotency with `onStoreError: 'pass'`). Such keys are kept as a SHA-256 digest instead.
 */
export const MAX_PLAIN_KEY_BYTES = 2600;
const DIGEST_PREFIX = '#sha256:';

/**
 * The `key` column for `key`: the key itself, or `#sha256:<hex>` of it when it is longer than
 * MAX_PLAIN_KEY_BYTES (or itself starts with that prefix, so no key can pose as another's digest).
 */
export function storedKey(key: string): string {
  // Three bytes per UTF-16 unit at most: the common short key is not measured.
  if (!key.startsWith(DIGEST_PREFIX) && (key.length * 3 <= MAX_PLAIN_KEY_BYTES || Buffer.byteLength(key) <= MAX_PLAIN_KEY_BYTES)) return key;
  return `${DIGEST_PREFIX}${createHash('sha256').update(key).digest('hex')}`;
}

/** A view on the same bytes: pg sends Buffers as binary parameters, without a copy. */
export function toBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Durations are sent as float8 ms; reject what would turn into NULL or nonsense intervals. */
export function checkMs(name: string, value: number): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
    throw new RangeError(`[idemkit] [postgres] \`${name}\` must be a positive number of ms, got ${String(value)}.`);
  }
  return value;
}

/** $1 key, $2 token, $3 status, $4 headers (jsonb array of [name, value]), $5 body, $6 ttl ms. */
export function completeParams(key: string, token: LeaseToken, response: StoredResponse, ttlMs: number): unknown[] {
  return [storedKey(key), token, response.status, JSON.stringify(response.headers), toBuffer(response.body), checkMs('ttlMs', ttlMs)];
}
