import { randomUUID } from 'node:crypto';
import autocannon from 'autocannon';
import { ORDER_BODY, REPLAY_KEY, type LoadPath } from './config.js';

export interface LoadOptions {
  /** Seconds of load. */
  readonly duration: number;
  readonly connections: number;
}

export interface LoadResult {
  /** Completed requests per second over the whole run. */
  readonly rps: number;
  /** Latency percentiles in ms. */
  readonly p50: number;
  readonly p99: number;
  readonly requests: number;
  /** Responses that were not 2xx, plus socket errors and timeouts: should all be 0. */
  readonly non2xx: number;
  readonly errors: number;
}

const HEADERS = { 'content-type': 'application/json' };

/**
 * Drives POST /orders with autocannon. `new-key`: a fresh Idempotency-Key per request (setupRequest
 * runs before each one); `replay`: one key for every request, primed beforehand, so the
 * idempotent servers answer from the store.
 */
export async function load(url: string, path: LoadPath, options: LoadOptions): Promise<LoadResult> {
  const request: autocannon.Request =
    path === 'new-key'
      ? (() => {
          const prefix = randomUUID();
          let n = 0;
          return {
            method: 'POST',
            path: '/orders',
            body: ORDER_BODY,
            headers: HEADERS,
            setupRequest: (req: autocannon.Request) => ({ ...req, headers: { ...req.headers, 'idempotency-key': `${prefix}-${n++}` } }),
          };
        })()
      : { method: 'POST', path: '/orders', body: ORDER_BODY, headers: { ...HEADERS, 'idempotency-key': REPLAY_KEY } };
  const result = await autocannon({
    url,
    connections: options.connections,
    pipelining: 1,
    duration: options.duration,
    requests: [request],
  });
  return {
    rps: result.requests.total / result.duration,
    p50: result.latency.p50,
    p99: result.latency.p99,
    requests: result.requests.total,
    non2xx: result.non2xx,
    errors: result.errors + result.timeouts,
  };
}

/** One request with the replay key, so the replay run only ever replays. */
export async function primeReplay(url: string): Promise<number> {
  const response = await fetch(`${url}/orders`, {
    method: 'POST',
    headers: { ...HEADERS, 'idempotency-key': REPLAY_KEY },
    body: ORDER_BODY,
  });
  await response.arrayBuffer();
  return response.status;
}
