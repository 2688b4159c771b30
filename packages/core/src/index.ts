// The engine: what every binding and `idempotent()` runs on.
export { createIdempotencyEngine, type IdempotencyEngine } from './engine.js';
// Options and their defaults, so bindings re-export one options type.
export { DEFAULTS, defaultStorable, optionalFunction, resolveOptions, type IdempotencyOptions, type LocalCacheOptions, type MaybePromise, type ResolvedOptions } from './options.js';
// The store contract every adapter implements (SPEC §3).
export type {
  BeginResult,
  IdempotencyRecord,
  IdempotencyStore,
  LeaseToken,
  RecordState,
  StoredResponse,
  StoreTransaction,
  TransactionalStore,
} from './store.js';
// What bindings exchange with the engine.
export type {
  AbandonReason,
  Decision,
  IdempotencyContext,
  IdempotencyEvent,
  IdempotencyLogger,
  IncomingHeaders,
  IncomingRequest,
  Lease,
  UnbufferedReason,
} from './types.js';
// Errors carry status/headers that Express, Koa and Fastify already understand.
export {
  ConfigurationError,
  FingerprintMismatchError,
  IdempotencyError,
  KeyError,
  PROBLEM_BASE,
  PROBLEM_CONTENT_TYPE,
  problemType,
  RequestInProgressError,
  ResponseNotReplayableError,
  StoreUnavailableError,
  TransactionAbortedError,
  TransactionEndedError,
  type IdempotencyErrorCode,
  type ProblemDetails,
} from './errors.js';
export { StoreTimeoutError } from './deadline.js';
// Byte-identical problem and replay responses across bindings.
export { problemResponse } from './problem.js';
export { hasRequestBody, REPLAYED_HEADER, requestCarriesBody, type NodeRequestLike, replayHeaders, responseHeaders, snapshotHeaders, toStoredHeaders, UNREPLAYED_HEADERS, type OutgoingHeaderValue } from './headers.js';
export { whenSocketCloses, type ClosableSocket } from './socket-close.js';
// Key and fingerprint helpers, for custom getKey/fingerprint functions.
export { hasBodyField, MAX_KEY_LENGTH, mayHaveKey, mayHoldBodyKey, parseKeyHeader, readsBody, scopedKey, unreadBodyKeyWarning, unreadBodyMayHoldKey, validateKey, type KeyParseResult, type KeySources } from './key.js';
export { canonicalBody, defaultFingerprint } from './fingerprint.js';
export { isMultipart, uploadedFileDigests } from './files.js';
export { upperMethod } from './method.js';
// The in-memory store: tests and single-process apps.
export { createMemoryStore, MemoryStore, MemoryStoreFullError, type MemoryStoreOptions } from './memory-store.js';
// Idempotency for plain functions (jobs, webhooks) and housekeeping for stores without native expiry.
export { idempotent, idempotentTransaction, type IdempotentOptions, type IdempotentTransactionOptions } from './idempotent.js';
export { startPurger, type Purger, type PurgerOptions } from './purger.js';
