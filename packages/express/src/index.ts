// The middleware factory and its options: what users call.
export { idempotency, idempotencyErrorHandler } from './middleware.js';
export type { ExpressIdempotencyOptions } from './options.js';
// What handlers read from req.idempotency, and the errors a custom onProblem receives.
export type { IdempotencyContext, IdempotencyErrorCode, ProblemDetails } from '@idemkit/core';
export {
  ConfigurationError,
  FingerprintMismatchError,
  IdempotencyError,
  KeyError,
  RequestInProgressError,
  ResponseNotReplayableError,
  StoreUnavailableError,
} from '@idemkit/core';
