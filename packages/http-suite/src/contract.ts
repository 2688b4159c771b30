import type { IdempotencyOptions, IdempotencyStore } from '@idemkit/core';

/**
 * What every binding's test app must provide so one behaviour suite (SPEC §2) runs against
 * Express, Koa and Fastify alike. Each binding's test starts its app through `StartApp`.
 */
export interface TestAppHandle {
  /** Base URL, e.g. `http://127.0.0.1:41234` (always 127.0.0.1, port 0). */
  readonly url: string;
  close(): Promise<void>;
}

/** Handler executions per route name, counted by the app, read by the suite. */
export type ExecutionCounter = Map<string, number>;

/**
 * Binding-independent idempotency options for the test app. The app passes these to its
 * binding together with `store`, and adds a `scope` that reads the `x-user` request header
 * (undefined when absent).
 */
export type TestIdempotencyOptions = Omit<IdempotencyOptions<unknown>, 'store' | 'scope' | 'getKey' | 'fingerprint'>;

export interface StartAppInput {
  readonly store: IdempotencyStore;
  readonly options: TestIdempotencyOptions;
  readonly counter: ExecutionCounter;
  /**
   * Work for `POST /tx` (transactional mode, Postgres only): the app calls it with the
   * `transaction` of the binding's idempotency context (`req.idempotency.transaction`,
   * `ctx.state.idempotency.transaction`, `request.idempotency.transaction`) and the parsed body,
   * and answers 201 JSON with what it returns; if it throws, the error flows to the framework.
   */
  readonly txWork?: (transaction: unknown, body: unknown) => Promise<unknown>;
  /**
   * When set, the app also passes a `getKey` that reads this request header through its
   * framework's own request (Express `req.get`, Koa `ctx.get`, Fastify `request.headers`),
   * undefined when absent: SPEC §2's custom `getKey(request)`.
   */
  readonly keyFrom?: string;
  /**
   * The gate `POST /orders?hold=<name>` waits at: the handler (after counting) awaits
   * `hold(name)`, which settles when the case opens that gate. It keeps a lease busy for exactly
   * as long as a case needs (every duplicate has arrived), where a fixed delay would only guess.
   */
  readonly hold: (name: string) => Promise<void>;
}

export type StartApp = (input: StartAppInput) => Promise<TestAppHandle>;

/**
 * Routes every test app implements (idempotency applied app-wide, JSON and raw body parsing on):
 *
 * - Every request to `POST /orders` counts `orders:arrived` as it arrives, before idempotency
 *   (and body parsing) see it: the suite knows when every duplicate has reached the server. That
 *   middleware also sets the response header `X-Arrival: <that count>` (a per-request header
 *   set before idempotency, as a request id or CORS is) and, when the request has an
 *   `X-Outer-Cookie` header, adds `Set-Cookie: arrival=<that count>` (the handler's cookies are
 *   added to it, not put in its place).
 * - `POST /orders` (JSON body). Counts `orders`. If the query has `delay=<ms>`, waits that long
 *   first; if it has `hold=<name>`, waits for `hold(name)` (see StartAppInput). Answers 201, JSON
 *   `{ "id": "<uuid>", "n": <execution number>, "body": <request body> }`, headers
 *   `Location: /orders/<id>`, `X-Custom: yes`, and two `Set-Cookie` headers `a=1` and `b=2`.
 *   If the query has `status=<code>`, answers that status instead of 201 (same body). If it has
 *   `hop=1`, also sets `Connection: close, X-Hop` and `X-Hop: 1` (a header its Connection names:
 *   hop-by-hop, RFC 9110 §7.6.1).
 * - `PATCH /orders/:id` (JSON body). Counts `patch`. Answers 200 JSON `{ "id": ":id", "n": n, "body": body }`.
 * - `GET /orders`. Counts `list`. Answers 200 JSON `{ "n": n }` (not covered by idempotency).
 * - `POST /binary`. Counts `binary`. Answers 200 `application/octet-stream`, the 256 bytes 0x00..0xFF.
 * - `POST /text` (text/plain body). Counts `text`. Answers 200 `text/plain` echoing the body.
 * - `POST /throw`. Counts `throw`. The handler throws `new Error('boom')` (the framework's own
 *   error handling answers 500). With `?status=<code>`, the error carries that code as the
 *   framework's own errors do (`status`/`statusCode`, `expose: true`), and the framework answers
 *   it (a 400, say). Express mounts `idempotencyErrorHandler()` after its routes, as its README asks.
 * - `POST /stream`. Counts `stream`. Answers 200 `text/plain` as a stream of 3 chunks
 *   (`a`, `b`, `c`, through a Node Readable / res.write calls).
 * - `POST /large`. Counts `large`. Answers 200 `application/octet-stream` with a Buffer of
 *   `Number(query.size)` bytes (0x61 each).
 * - `POST /tx` (JSON body). Counts `tx`. Calls `txWork` (see StartAppInput) and answers 201 JSON.
 *   The middleware before idempotency sets `Access-Control-Allow-Origin: https://shop.example` on
 *   it (a CORS middleware's header, which a rolled-back answer's 503 keeps).
 * - `POST /create` (JSON `{ idempotencyKey, data }`, the original design's sample). Counts
 *   `create`. Answers 201 JSON `{ "id": "<uuid>", "data": <data> }`.
 */