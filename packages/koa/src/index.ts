// The middleware factory and its options: what users call.
export { idempotency, type IdempotencyState } from './middleware.js';
export type { KoaIdempotencyOptions } from './options.js';
// What handlers read from ctx.state.idempotency, what onProblem and error handlers receive,
// and what onEvent reports (the same set as @idemkit/express and @idemkit/fastify export).
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
