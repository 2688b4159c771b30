// The middleware and its options.
export { idempotency } from './middleware.js';
export type { KoaIdempotencyOptions } from './options.js';
// What handlers and error handlers meet: `ctx.state.idempotency`, thrown errors, events.
export {
  ConfigurationError,
  IdempotencyError,
  type IdempotencyContext,
  type IdempotencyEvent,
  type IdempotencyStore,
} from '@idemkit/core';
