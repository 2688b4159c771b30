import { optionalFunction, type IdempotencyError, type IdempotencyOptions } from '@idemkit/core';
import type { NextFunction, Request, Response } from 'express';

/**
 * Options of `idempotency()`: every engine option of `@idemkit/core` (callbacks receive the
 * Express `Request`), plus Express-only extras.
 */
export interface ExpressIdempotencyOptions extends IdempotencyOptions<Request> {
  /**
   * Write a problem (400, 409, 422, 503) your own way instead of the default
   * `application/problem+json` body, which is byte-identical across the Express, Koa and Fastify
   * bindings. Call `next(error)` to hand it to your error handler (the error carries `status`
   * and `headers`). Never called for replays, the stored 410 of an answer that could not be
   * stored included.
   */
  onProblem?: ((error: IdempotencyError, req: Request, res: Response, next: NextFunction) => void) | undefined;
}

/** Splits the binding-only extras off, so the engine never warns about unknown options. */
export function splitOptions(options: ExpressIdempotencyOptions): {
  engine: IdempotencyOptions<Request>;
  onProblem: ExpressIdempotencyOptions['onProblem'];
} {
  if (typeof options !== 'object' || options === null) return { engine: options, onProblem: undefined };
  const { onProblem, ...engine } = options;
  return { engine, onProblem: optionalFunction('onProblem', onProblem) };
}
