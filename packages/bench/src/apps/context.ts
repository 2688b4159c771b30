import type { IdempotencyStore } from '@idemkit/core';
import type { Idempotency } from '@node-idempotency/core';
import { SLOW_HANDLER_MS, type ServerStats } from '../config.js';

/** What sits in front of the handler, already opened by the server process. */
export type LibrarySetup =
  | { readonly kind: 'bare' }
  | { readonly kind: 'idemkit'; readonly store: IdempotencyStore; readonly ttlMs: number }
  | { readonly kind: 'express-idempotency' }
  | { readonly kind: 'node-idempotency'; readonly idempotency: Idempotency };

export interface Counters {
  requests: number;
  runs: number;
  slowRuns: number;
}

export interface AppContext {
  readonly library: LibrarySetup;
  readonly counters: Counters;
  stats(): ServerStats;
}

interface OrderInput {
  readonly sku?: unknown;
  readonly qty?: unknown;
}

/** The one handler every server runs: a small JSON answer, 201 Created. */
export function createOrder(counters: Counters, body: unknown): { id: string; sku: unknown; qty: unknown } {
  counters.runs++;
  const input = (body ?? {}) as OrderInput;
  return { id: `ord_${counters.runs}`, sku: input.sku, qty: input.qty };
}

/** The race check's handler: long enough (50 ms) for 50 parallel duplicates to overlap it. */
export async function createOrderSlowly(counters: Counters, body: unknown): Promise<{ id: string; sku: unknown; qty: unknown }> {
  counters.slowRuns++;
  await new Promise((resolve) => setTimeout(resolve, SLOW_HANDLER_MS));
  const input = (body ?? {}) as OrderInput;
  return { id: `slow_${counters.slowRuns}`, sku: input.sku, qty: input.qty };
}
