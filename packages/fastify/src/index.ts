// The plugin (also the default export, as the Fastify ecosystem expects).
export { fastifyIdempotency, fastifyIdempotency as default } from './plugin.js';
// Option types for the plugin and for per-route `config.idempotency`.
export type { FastifyIdempotencyOptions, RouteIdempotencyConfig, RouteIdempotencyOptions } from './options.js';
// What handlers read from `request.idempotency`, what `onProblem` and error handlers receive,
// and what `onEvent` reports (the same set as @idemkit/express and @idemkit/koa export).
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
