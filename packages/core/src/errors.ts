import { brandErrorClasses } from './error-brand.js';

/**
 * One small hierarchy that Express's finalhandler, Koa's ctx.onerror and Fastify's error handler
 * already understand: they read `status`/`statusCode`, `headers` and (Koa) `expose`.
 */

export const PROBLEM_BASE = 'https://idemkit.dev/problems/';

export type IdempotencyErrorCode =
  | 'ERR_IDEMKIT_KEY_MISSING'
  | 'ERR_IDEMKIT_KEY_INVALID'
  | 'ERR_IDEMKIT_FINGERPRINT_MISMATCH'
  | 'ERR_IDEMKIT_REQUEST_IN_PROGRESS'
  | 'ERR_IDEMKIT_RESPONSE_NOT_REPLAYABLE'
  | 'ERR_IDEMKIT_STORE_UNAVAILABLE';

/** RFC 9457 problem details, as every binding writes them (`application/problem+json`). */
export interface ProblemDetails {
  readonly type: string;
  readonly title: string;
  readonly status: number;
  readonly detail: string;
  readonly code: IdempotencyErrorCode;
  readonly [extension: string]: unknown;
}

export const PROBLEM_CONTENT_TYPE = 'application/problem+json';

const TITLES: Record<IdempotencyErrorCode, string> = {
  ERR_IDEMKIT_KEY_MISSING: 'Idempotency key missing',
  ERR_IDEMKIT_KEY_INVALID: 'Idempotency key invalid',
  ERR_IDEMKIT_FINGERPRINT_MISMATCH: 'Idempotency key reused with a different request',
  ERR_IDEMKIT_REQUEST_IN_PROGRESS: 'A request with this idempotency key is in progress',
  ERR_IDEMKIT_RESPONSE_NOT_REPLAYABLE: 'The response for this idempotency key cannot be replayed',
  ERR_IDEMKIT_STORE_UNAVAILABLE: 'Idempotency store unavailable',
};

/** `ERR_IDEMKIT_KEY_MISSING` → `https://idemkit.dev/problems/key-missing`. */
export function problemType(code: IdempotencyErrorCode): string {
  return PROBLEM_BASE + code.slice('ERR_IDEMKIT_'.length).toLowerCase().replaceAll('_', '-');
}

export class IdempotencyError extends Error {
  override readonly name: string = this.constructor.name;
  /** Koa renders `message` to the client only when `expose` is true. */
  readonly expose = true;
  readonly code: IdempotencyErrorCode;
  readonly status: number;
  readonly headers: Readonly<Record<string, string>>;
  /** Extra RFC 9457 members (e.g. `retryAfter`). */
  readonly extensions: Readonly<Record<string, unknown>>;

  constructor(
    code: IdempotencyErrorCode,
    status: number,
    message: string,
    options: {
      headers?: Record<string, string>;
      extensions?: Record<string, unknown>;
      cause?: unknown;
    } = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.status = status;
    this.headers = Object.freeze({ ...options.headers });
    this.extensions = Object.freeze({ ...options.extensions });
  }

  /** Fastify reads `statusCode`. */
  get statusCode(): number {
    return this.status;
  }

  get type(): string {
    return problemType(this.code);
  }

  get title(): string {
    return TITLES[this.code];
  }

  toProblem(): ProblemDetails {
    return {
      ...this.extensions,
      type: this.type,
      title: this.title,
      status: this.status,
      detail: this.message,
      code: this.code,
    };
  }
}

/** 400: the key is missing or malformed. */
export class KeyError extends IdempotencyError {}
/** 422: the key was used before with a different request. */
export class FingerprintMismatchError extends IdempotencyError {}
/** The 422 for a key whose record belongs to another request (another fingerprint). */
export function fingerprintMismatch(): FingerprintMismatchError {
  return new FingerprintMismatchError(
    'ERR_IDEMKIT_FINGERPRINT_MISMATCH',
    422,
    'This key was already used with a different request (method, path or body). Use a new key for a new request.',
  );
}
/** 409 + Retry-After: the first request with the key still runs. */
export class RequestInProgressError extends IdempotencyError {}

/** Whole seconds left on a lease, for Retry-After: rounded up, at least 1. */
export function retryAfterSeconds(leaseRemainingMs: number): number {
  return Math.max(1, Math.ceil(leaseRemainingMs / 1000));
}

/** The 409 for a key whose lease still runs, with Retry-After (and `retryAfter`) in seconds. */
export function requestInProgress(retryAfter: number, detail: string): RequestInProgressError {
  return new RequestInProgressError('ERR_IDEMKIT_REQUEST_IN_PROGRESS', 409, detail, {
    headers: { 'retry-after': String(retryAfter) },
    extensions: { retryAfter },
  });
}

/** 410: the first response was a stream or too large to store; the handler is never re-run. */
export class ResponseNotReplayableError extends IdempotencyError {}
/** 503: the store failed; `cause` is the driver error. */
export class StoreUnavailableError extends IdempotencyError {}

/** Setup-time misconfiguration. Never an HTTP answer: it is thrown when options are resolved. */
export class ConfigurationError extends Error {
  override readonly name: string = this.constructor.name;
  readonly code: string;
  constructor(code: `ERR_IDEMKIT_${string}`, message: string) {
    super(`[idemkit] ${message}`);
    this.code = code;
  }
}

/**
 * Thrown by a store transaction (`StoreTransaction.complete` or `rollback`) when the handler
 * ended the transaction it was given itself: a `COMMIT` or `ROLLBACK` on the transaction client,
 * often a helper that wraps its queries in its own BEGIN/COMMIT. Its writes then committed (or
 * vanished) on their own, apart from the record. Never an HTTP answer: the engine logs it and
 * stores a "not replayable" marker, so the operation is not run a second time.
 */
export class TransactionEndedError extends Error {
  override readonly name: string = this.constructor.name;
  readonly code = 'ERR_IDEMKIT_TRANSACTION_ENDED';
  constructor(message = 'The handler ended the transaction idemkit opened for it (COMMIT or ROLLBACK on the transaction client).') {
    super(`[idemkit] ${message}`);
  }
}

/**
 * Thrown by `StoreTransaction.complete` when a failed statement of the handler's had already
 * aborted the transaction (the handler caught it and answered anyway): nothing committed. `cause`
 * is the driver's error. The engine then lets a 4xx answer out as it is (it claims no writes,
 * and none were made) instead of the "rolled back, retry" 503 every other failed completion gets.
 */
export class TransactionAbortedError extends Error {
  override readonly name: string = this.constructor.name;
  readonly code = 'ERR_IDEMKIT_TRANSACTION_ABORTED';
  constructor(message = 'A failed statement had aborted the transaction before its completion; nothing was committed.', options?: ErrorOptions) {
    super(`[idemkit] ${message}`, options);
  }
}

/** By code, not `instanceof`, as `isTransactionEnded`. */
export function isTransactionAborted(error: unknown): boolean {
  return error instanceof TransactionAbortedError || (error instanceof Error && (error as { code?: unknown }).code === 'ERR_IDEMKIT_TRANSACTION_ABORTED');
}

/**
 * By code, not `instanceof`: a store built against another copy of `@idemkit/core` (an ESM and a
 * CJS copy in one app) throws that copy's class, and mistaking it for a plain store failure
 * would free the key for a second run.
 */
export function isTransactionEnded(error: unknown): boolean {
  return error instanceof TransactionEndedError || (error instanceof Error && (error as { code?: unknown }).code === 'ERR_IDEMKIT_TRANSACTION_ENDED');
}

brandErrorClasses(
  IdempotencyError,
  KeyError,
  FingerprintMismatchError,
  RequestInProgressError,
  ResponseNotReplayableError,
  StoreUnavailableError,
  ConfigurationError,
  TransactionEndedError,
  TransactionAbortedError,
);
