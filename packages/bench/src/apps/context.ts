import type { IdempotencyStore } from '@idemkit/core';
import type { Idempotency } from '@node-idempotency/core';
import { HANG_HEADER, SLOW_HANDLER_MS, type ServerStats } from '../config.js';
import type { AnswerKeeper } from './probes.js';

/** What sits in front of the handler, already opened by the server process. */
export type LibrarySetup =
  | { readonly kind: 'bare' }
  | { readonly kind: 'idemkit'; readonly store: IdempotencyStore; readonly ttlMs: number; readonly leaseMs: number | undefined; readonly storeTimeoutMs: number | undefined; readonly localCache: boolean }
  | { readonly kind: 'express-idempotency' }
  | { readonly kind: 'node-idempotency'; readonly idempotency: Idempotency }
  | { readonly kind: 'probe-hook' }
  | { readonly kind: 'probe-store'; readonly keeper: AnswerKeeper };

export interface Counters {
  requests: number;
  runs: number;
  slowRuns: number;
  crashRuns: number;
}

export interface AppContext {
  readonly library: LibrarySetup;
  readonly counters: Counters;
  /** The /orders handler's work (see `HandlerKind`). */
  readonly order: (body: unknown) => Order | Promise<Order>;
  stats(): ServerStats;
}

export interface Order {
  readonly id: string;
  readonly sku: unknown;
  readonly qty: unknown;
}

interface OrderInput {
  readonly sku?: unknown;
  readonly qty?: unknown;
}

/** The `hello` handler: a small JSON answer, 201 Created. */
export function createOrder(counters: Counters, body: unknown): Order {
  counters.runs++;
  const input = (body ?? {}) as OrderInput;
  return { id: `ord_${counters.runs}`, sku: input.sku, qty: input.qty };
}

/** Runs one statement; the `pg` Pool's `query`, narrowed to what the handler needs. */
export type Query = (text: string, values: unknown[]) => Promise<{ rows: Array<{ id: string }> }>;

/** The `postgres` handler: one INSERT … RETURNING id, then the same answer as `hello`. */
export async function createOrderInPostgres(query: Query, table: string, counters: Counters, body: unknown): Promise<Order> {
  counters.runs++;
  const input = (body ?? {}) as OrderInput;
  const { rows } = await query(`INSERT INTO ${table} (sku, qty) VALUES ($1, $2) RETURNING id`, [String(input.sku), Number(input.qty)]);
  return { id: `ord_${rows[0]?.id ?? '?'}`, sku: input.sku, qty: input.qty };
}

/** The race check's handler: long enough (50 ms) for 50 parallel duplicates to overlap it. */
export async function createOrderSlowly(counters: Counters, body: unknown): Promise<Order> {
  counters.slowRuns++;
  await new Promise((resolve) => setTimeout(resolve, SLOW_HANDLER_MS));
  const input = (body ?? {}) as OrderInput;
  return { id: `slow_${counters.slowRuns}`, sku: input.sku, qty: input.qty };
}

/**
 * The crash check's handler: with the hang header it never answers (the process is killed while
 * it runs, as a deploy or an OOM kill would); without it, the retry's answer.
 */
export async function createOrderOrHang(counters: Counters, headers: Readonly<Record<string, unknown>>, body: unknown): Promise<Order> {
  counters.crashRuns++;
  if (headers[HANG_HEADER] !== undefined) await new Promise<never>(() => undefined);
  const input = (body ?? {}) as OrderInput;
  return { id: `crash_${counters.crashRuns}`, sku: input.sku, qty: input.qty };
}
