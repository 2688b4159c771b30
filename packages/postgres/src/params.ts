import type { LeaseToken, StoredResponse } from '@idemkit/core';

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
  return [key, token, response.status, JSON.stringify(response.headers), toBuffer(response.body), checkMs('ttlMs', ttlMs)];
}
