import type { IdempotencyError, IdempotencyOptions } from '@idemkit/core';
import type { Context } from 'koa';

/**
 * Options of the Koa middleware: every core option (see `@idemkit/core`'s `IdempotencyOptions`),
 * with callbacks (`getKey`, `scope`, `fingerprint`) receiving the Koa `ctx`, plus `onProblem`.
 */
export interface KoaIdempotencyOptions extends IdempotencyOptions<Context> {
  /**
   * Answer a problem (missing/invalid key, 409 in progress, 422 mismatch, 503 store down)
   * yourself instead of the built-in RFC 9457 `application/problem+json` reply. Set
   * `ctx.status`, headers and `ctx.body`; the handler is not run either way. Never called for
   * replays, the stored 410 of an answer that could not be stored included.
   * @default writes `problemResponse(error)` from `@idemkit/core`
   */
  onProblem?: ((ctx: Context, error: IdempotencyError) => void | Promise<void>) | undefined;
}
