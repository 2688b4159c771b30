// The safe-retry fetch and its options.
export {
  createIdempotentFetch,
  RequestNotSentError,
  RetryDeadlineError,
  RetryExhaustedError,
  type AttemptInfo,
  type IdempotentFetch,
  type IdempotentFetchOptions,
  type IdempotentRequestInit,
} from './idempotent-fetch.js';
// The retry rules, for callers who build their own loop.
export { backoffDelay, defaultRetryOn, parseRetryAfter, pollDelay } from './retry-policy.js';
