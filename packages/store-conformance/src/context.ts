import { randomUUID } from 'node:crypto';
import type { IdempotencyRecord, IdempotencyStore, LeaseToken, StoredResponse } from '@idemkit/core';
import { afterAll, beforeAll, expect, it, vi } from 'vitest';
import type { StoreConformanceOptions } from './options.js';

/** A lease or TTL that never runs out during a run. */
export const LONG_MS = 10 * 60_000;
/** A lease or TTL meant to run out during a test: short, but far above one round trip. */
export const SHORT_MS = 400;
/**
 * Allowed difference between the store's clock and this process's clock (plus round-trip time)
 * when the suite compares store timestamps with `Date.now()`. Only used with LONG_MS spans.
 */
export const SKEW_MS = 2_000;
/**
 * How soon after a short lease or TTL has ended the record must be gone, as this process measures
 * it (monotonic clock, from before the write): the store's clock runs at the same rate, so only
 * round trips and polling add to SHORT_MS. A store that honours a lease or TTL some grace period
 * late (its own safety margin read as part of it) keeps a crashed holder's key locked that long.
 */
export const PROMPT_MS = 2_000;
/** Polling for conditions that become true once a short lease/TTL has run out. */
export const WAIT = { timeout: 15_000, interval: 20 } as const;
/** Per-test timeout, so a user's default 5 s config does not cut off remote backends. */
const TEST_TIMEOUT_MS = 60_000;

/** What every clause gets: the options plus keys unique to this run. */
export interface SuiteContext {
  readonly options: StoreConformanceOptions;
  /** A fresh key under this run's prefix; `label` only helps reading a backend by hand. */
  key(label?: string): string;
}

export function createContext(options: StoreConformanceOptions): SuiteContext {
  // One prefix per run, so several runs (and several stores) can share one database.
  const prefix = `idemkit-conformance:${randomUUID()}:`;
  return {
    options,
    key: (label = 'k') => `${prefix}${label}:${randomUUID()}`,
  };
}

/** `it` with a timeout that fits remote backends. */
export function clause(title: string, fn: () => Promise<void>): void {
  it(title, { timeout: TEST_TIMEOUT_MS }, fn);
}

/**
 * A store for the enclosing describe: created in beforeAll (and warmed with one read, so the first
 * timed operation does not pay for connecting), closed in afterAll.
 */
export function useStore(
  ctx: SuiteContext,
  factory: () => IdempotencyStore | Promise<IdempotencyStore> = ctx.options.createStore,
): () => IdempotencyStore {
  let store: IdempotencyStore | undefined;
  beforeAll(async () => {
    store = await factory();
    await store.get(ctx.key('warm-up'));
  });
  afterAll(async () => {
    await store?.close();
  });
  return () => {
    if (store === undefined) throw new Error('store-conformance: store used before beforeAll created it');
    return store;
  };
}

export function asToken(value: string): LeaseToken {
  return value as LeaseToken;
}

/** Begin and insist on `acquired`; returns the token. */
export async function acquire(
  store: IdempotencyStore,
  key: string,
  leaseMs = LONG_MS,
  fingerprint: string | null = 'fp',
): Promise<LeaseToken> {
  const result = await store.begin(key, fingerprint, leaseMs);
  if (result.kind !== 'acquired') {
    throw new Error(`expected begin(${JSON.stringify(key)}) to acquire, got ${result.kind}`);
  }
  return result.token;
}

/** Begin + complete; returns the response stored. */
export async function completed(
  store: IdempotencyStore,
  key: string,
  response: StoredResponse = textResponse(key),
  ttlMs = LONG_MS,
): Promise<StoredResponse> {
  const token = await acquire(store, key);
  expect(await store.complete(key, token, response, ttlMs)).toBe(true);
  return response;
}

/** Wait until the store no longer reports `key` as live (its lease or TTL ran out). */
export async function waitUntilGone(store: IdempotencyStore, ...keys: string[]): Promise<void> {
  await vi.waitFor(async () => {
    for (const key of keys) expect(await store.get(key)).toBeUndefined();
  }, WAIT);
}

/**
 * Wait until everything written so far has expired by the store's clock, without reading those
 * records: a store may delete an expired record when it is read (the in-memory store does), which
 * would change purge counts, and would hide a `begin` that still answers with an expired record.
 * A canary lease begun now runs out last. The canary is then taken over and released, so it is
 * not left behind as one more expired record.
 */
export async function waitForExpiry(store: IdempotencyStore, ctx: SuiteContext): Promise<void> {
  const canary = ctx.key('expiry-canary');
  await acquire(store, canary, SHORT_MS);
  await waitUntilGone(store, canary);
  const token = await acquire(store, canary, LONG_MS);
  expect(await store.release(canary, token)).toBe(true);
}

/** Get and insist the record is there. */
export async function mustGet(store: IdempotencyStore, key: string): Promise<IdempotencyRecord> {
  const record = await store.get(key);
  if (record === undefined) throw new Error(`expected get(${JSON.stringify(key)}) to find a record`);
  return record;
}

export function bytes(text: string): Uint8Array {
  return new TextEncoder().encode(text);
}

export function textResponse(text: string, status = 200): StoredResponse {
  return { status, headers: [['content-type', 'text/plain; charset=utf-8']], body: bytes(text) };
}

export function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.byteLength !== b.byteLength) return false;
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

/** Status, headers (order and repeats included) and body bytes all equal. */
export function expectSameResponse(actual: StoredResponse | null | undefined, expected: StoredResponse): void {
  expect(actual).toBeTruthy();
  if (!actual) return;
  expect(actual.status).toBe(expected.status);
  expect(actual.headers.map(([n, v]) => [n, v])).toEqual(expected.headers.map(([n, v]) => [n, v]));
  expect(actual.body).toBeInstanceOf(Uint8Array);
  // Compare lengths first for a readable failure; never diff 1 MiB arrays element by element.
  expect(actual.body.byteLength).toBe(expected.body.byteLength);
  expect(bytesEqual(actual.body, expected.body)).toBe(true);
}

/** `value` lies within `target ± tolerance`. */
export function expectNear(value: number, target: number, tolerance = SKEW_MS): void {
  expect(value).toBeGreaterThanOrEqual(target - tolerance);
  expect(value).toBeLessThanOrEqual(target + tolerance);
}

/** Plain copy of a record (for "nothing changed" comparisons that are not fooled by identity). */
export function snapshot(record: IdempotencyRecord | undefined): unknown {
  if (record === undefined) return undefined;
  const { response, ...rest } = record;
  return {
    ...rest,
    response:
      response === null
        ? null
        : { status: response.status, headers: response.headers.map(([n, v]) => [n, v]), body: Buffer.from(response.body).toString('base64') },
  };
}
