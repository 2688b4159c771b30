import { STATUS_CODES } from 'node:http';
import type { IdempotencyContext } from '@idemkit/core';
import type { Backend } from './backend.js';

/** A framework-neutral answer each app writes as it is. */
export interface DemoResponse {
  readonly status: number;
  readonly headers: Record<string, string>;
  readonly body: unknown;
}

const PROBLEM = 'application/problem+json';

export function problem(status: number, slug: string, title: string, detail: string): DemoResponse {
  return {
    status,
    headers: { 'content-type': PROBLEM },
    body: { type: `https://idemkit.dev/demo/problems/${slug}`, title, status, detail },
  };
}

/**
 * An error a parser or idemkit marked as the client's (a 4xx with `expose`), such as idemkit's 415
 * for a body no parser read (`text/plain` here): its own status as a problem, not a 500.
 */
export const clientError = (status: number, detail: string) =>
  problem(status, status === 415 ? 'unsupported-media-type' : 'bad-request', STATUS_CODES[status] ?? 'Bad request', detail);

export const invalidJson = (detail: string) => problem(400, 'invalid-json', 'Request body is not valid JSON', detail);
export const tooLarge = () => problem(413, 'body-too-large', 'Request body too large', 'The body is larger than 100 KB.');

/**
 * Why a parsed JSON body is refused as Fastify's parser (secure-json-parse) refuses it, or
 * undefined: an own `__proto__` key, or a `constructor` object with an own `prototype`, at any
 * depth. Express's JSON.parse keeps both as plain keys and Koa's parser (bourne) refuses only the
 * first, so without this the three apps answered the same body 201, 400 and 400. Checked before
 * idemkit (as a parser's refusal is), so the 400 is not stored under the key on one app only.
 * A loop, not recursion: 100 KB of `[` nests deeper than the call stack goes.
 */
export function forbiddenProperty(body: unknown): string | undefined {
  const pending: unknown[] = [body];
  while (pending.length > 0) {
    const node = pending.pop();
    if (typeof node !== 'object' || node === null) continue;
    const constructor: unknown = Object.hasOwn(node, 'constructor') ? (node as { constructor: unknown }).constructor : undefined;
    if (Object.hasOwn(node, '__proto__') || (typeof constructor === 'object' && constructor !== null && Object.hasOwn(constructor, 'prototype'))) {
      return 'Object contains forbidden prototype property';
    }
    for (const value of Object.values(node)) if (typeof value === 'object' && value !== null) pending.push(value);
  }
  return undefined;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * What every backend can store as it is: Postgres's `integer` column holds 2^31 - 1 at most, and
 * its `text` no NUL; no UTF-8 store keeps a lone surrogate (it becomes U+FFFD, so the order listed
 * would differ from the one answered). Refused up front, on every store alike, instead of a 500
 * from Postgres only.
 */
export const MAX_AMOUNT = 2_147_483_647;
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

/** POST /orders: validate, "charge" (DEMO_WORK_MS), then create the order. */
export async function placeOrder(backend: Backend, workMs: number, body: unknown, ctx: IdempotencyContext | null | undefined): Promise<DemoResponse> {
  const input = body as { item?: unknown; amount?: unknown } | undefined;
  if (typeof input !== 'object' || input === null || typeof input.item !== 'string' || input.item.trim() === '') {
    return problem(400, 'invalid-order', 'Invalid order', '`item` must be a non-empty string.');
  }
  if (input.item.includes('\u0000') || LONE_SURROGATE.test(input.item)) {
    return problem(400, 'invalid-order', 'Invalid order', '`item` may not hold NUL characters or unpaired surrogates.');
  }
  if (typeof input.amount !== 'number' || !Number.isInteger(input.amount) || input.amount <= 0 || input.amount > MAX_AMOUNT) {
    return problem(400, 'invalid-order', 'Invalid order', `\`amount\` must be a positive integer (cents), at most ${MAX_AMOUNT}.`);
  }
  await sleep(workMs); // the payment provider call: the side effect that must not happen twice
  const order = await backend.orders.insert({ item: input.item, amount: input.amount, key: ctx?.key ?? null }, ctx?.transaction);
  return { status: 201, headers: { location: `/orders/${order.id}` }, body: order };
}

/** POST /create: the original design's sample, `{ idempotencyKey, data }` → 201 `{ id, data }`. */
export async function createThing(backend: Backend, body: unknown, ctx: IdempotencyContext | null | undefined): Promise<DemoResponse> {
  const data = (body as { data?: unknown } | undefined)?.data;
  if (data === undefined) return problem(400, 'invalid-create', 'Invalid body', 'Send `{ "idempotencyKey": "...", "data": { ... } }`.');
  const order = await backend.orders.insert({ item: 'create', amount: 1, key: ctx?.key ?? null }, ctx?.transaction);
  return { status: 201, headers: {}, body: { id: order.id, data } };
}

export async function listOrders(backend: Backend): Promise<DemoResponse> {
  return { status: 200, headers: {}, body: { orders: await backend.orders.list() } };
}

/** GET /orders/:id: the order a 201's `Location` names. */
export async function getOrder(backend: Backend, id: string): Promise<DemoResponse> {
  const order = await backend.orders.get(id);
  return order ? { status: 200, headers: {}, body: order } : problem(404, 'order-not-found', 'Order not found', `No order has the id ${JSON.stringify(id)}.`);
}
