import { createIdempotencyEngine, createMemoryStore, type IdempotencyEvent, type IdempotencyOptions, type IncomingRequest, type StoredResponse } from '../src/index.js';

export const enc = new TextEncoder();

export function request(overrides: Partial<IncomingRequest> & { key?: string | string[] } = {}): IncomingRequest {
  const { key, ...rest } = overrides;
  return {
    method: 'POST',
    path: '/orders',
    headers: key === undefined ? {} : { 'idempotency-key': Array.isArray(key) ? key : [key] },
    body: { item: 'book', amount: 1 },
    ...rest,
  };
}

export function response(status = 201, body = '{"ok":true}'): StoredResponse {
  return { status, headers: [['content-type', 'application/json'], ['set-cookie', 'a=1'], ['set-cookie', 'b=2']], body: enc.encode(body) };
}

export function setup(options: Partial<IdempotencyOptions> = {}) {
  const store = createMemoryStore();
  const events: IdempotencyEvent[] = [];
  const engine = createIdempotencyEngine({ store, logger: false, onEvent: (e) => events.push(e), ...options });
  return { store, engine, events };
}
