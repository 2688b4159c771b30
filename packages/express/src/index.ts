// The middleware factory and its options: what users call.
export { idempotency, idempotencyErrorHandler } from './middleware.js';
export type { ExpressIdempotencyOptions } from './options.js';
// What handlers read from req.idempotency, what onProblem and error handlers receive, and what
// onEvent reports (the same set as @idemkit/koa and @idemkit/fastify export).
export type { IdempotencyContext, IdempotencyErrorCode, IdempotencyEvent, IdempotencyStore, ProblemDetails } from '@idemkit/core';
export {
  ConfigurationError,
  FingerprintMismatchError,
  IdempotencyError,
  KeyError,
  RequestInProgressError,
  ResponseNotReplayableError,
  StoreUnavailableError,
} from '@idemkit/core';
