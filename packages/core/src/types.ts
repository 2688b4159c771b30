import type { IdempotencyError } from './errors.js';
import type { StoredResponse } from './store.js';

/** Header values as Node gives them (`req.headers` or `req.headersDistinct`), lower-case names. */
export type IncomingHeaders = Readonly<Record<string, string | readonly string[] | undefined>>;

/**
 * What a binding tells the engine about one operation. Built by the binding from the framework
 * request; the engine never sees the framework.
 */
export interface IncomingRequest {
  /** Upper-case HTTP method (`'POST'`), or a job name for `idempotent()`. */
  readonly method: string;
  /** Request path with its query string, as received (`/orders?dry=1`). */
  readonly path: string;
  /**
   * Request headers. `req.headers` will do: Node joins repeated lines of unknown headers with
   * `, `, and a bare key with a comma is refused. An array with several values is refused too.
   */
  readonly headers: IncomingHeaders;
  /**
   * The body: a parsed JSON value (object, array, …), raw bytes (`Uint8Array`/`Buffer`), a string,
   * or `undefined` when there is none.
   */
  readonly body: unknown;
  /**
   * Files a multipart parser kept beside the body (koa-body's `ctx.request.files`, multer's
   * `req.file(s)`): field name → the SHA-256 of each file's bytes, in upload order
   * (`uploadedFileDigests` computes it). Part of the default fingerprint: two uploads with the same
   * fields and different files are different requests.
   */
  readonly files?: Readonly<Record<string, readonly string[]>>;
}

/**
 * Why a response was not stored: a stream, over `maxBodyBytes`, (jobs) a result `serialize`
 * refused, or a raw answer cut short before its status went out (then the status is `null`).
 */
export type UnbufferedReason = 'not-bufferable' | 'too-large' | 'not-serializable' | 'cut-short';

export type AbandonReason =
  | 'handler-threw'
  | 'not-storable'
  | 'client-gone'
  | 'not-bufferable'
  | 'too-large';

/** The right to run the handler for one key, held until `commit` or `abandon` (exactly once). */
export interface Lease {
  /** The client's key (unscoped). */
  readonly key: string;
  /** True when a crashed holder's expired lease was taken over. */
  readonly tookOver: boolean;
  /**
   * The handler answered. If `response.status` is storable (and the body fits `maxBodyBytes`)
   * the response is stored for replay; otherwise the key is released so a retry may run again.
   * Resolves to true when the response was stored. Never throws: a lost lease or a failing store
   * is reported through `onEvent`/`logger` and the caller still delivers the response.
   */
  commit(response: StoredResponse): Promise<boolean>;
  /**
   * The handler answered with something that cannot be buffered (a stream, SSE, a body over
   * `maxBodyBytes`). The handler is never re-run for this key: when `status` is storable a
   * marker is stored and retries get a `response-not-replayable` problem; otherwise the key is released.
   * A `null` status (with reason `cut-short`: a raw answer cut short before its status went
   * out) always stores the marker: what the status would have been is unknown.
   */
  commitUnbuffered(status: number | null, reason: UnbufferedReason): Promise<void>;
  /** Give the key up: the handler threw or the client went away before an answer existed. */
  abandon(reason: AbandonReason): Promise<void>;
  /**
   * Stop renewing without settling: the lease then runs out `leaseMs` after its last renewal, as
   * a crashed holder's would, and the next request with the key takes over. For a binding that
   * can no longer tell whether the handler will still answer (its response closed after the head
   * went out, with no end). A `commit` or `abandon` before then still works. In transactional
   * mode the lease is renewed for a whole `leaseMs` from this call (less only if renewals stop
   * getting through), then the transaction is rolled back and the key freed.
   */
  letLapse(): void;
  /**
   * Set after `commit` when the handler's answer must NOT reach the client: in transactional mode
   * its writes were rolled back (its lease was taken over, or COMMIT failed), so its response
   * describes something that never happened. The binding sends this instead, replacing status,
   * headers and body: the winner's stored response (with `idempotent-replayed: true`), a 409 while
   * the winner still runs, or a 503. Always null outside transactional mode, where the handler's
   * side effects did happen and its answer is the truth.
   */
  readonly replacement: StoredResponse | null;
  /** What handlers may see: key, takeover flag and the transaction client. */
  readonly context: IdempotencyContext;
  /** True once commit/commitUnbuffered/abandon has been called. */
  readonly settled: boolean;
}

/** What the engine decided for one incoming operation. */
export type Decision =
  /** Not covered (method, no key with `required: false`, store down with `onStoreError: 'pass'`). */
  | { readonly kind: 'pass' }
  /** Replay this response; the binding adds `Idempotent-Replayed: true`. */
  | { readonly kind: 'replay'; readonly key: string; readonly response: StoredResponse }
  /** Answer this problem (`error.status`, `error.headers`, `error.toProblem()`). */
  | { readonly kind: 'problem'; readonly error: IdempotencyError }
  /** Run the handler, then settle the lease. */
  | { readonly kind: 'run'; readonly lease: Lease };

/** Everything the engine reports, for logs and metrics. */
export type IdempotencyEvent =
  | { readonly type: 'executed'; readonly key: string; readonly tookOver: boolean }
  | { readonly type: 'completed'; readonly key: string; readonly status: number; readonly stored: boolean }
  | { readonly type: 'replayed'; readonly key: string; readonly status: number }
  | { readonly type: 'conflict'; readonly key: string; readonly retryAfterSeconds: number }
  | { readonly type: 'mismatch'; readonly key: string }
  | { readonly type: 'lease-taken-over'; readonly key: string }
  | { readonly type: 'lease-lost'; readonly key: string; readonly operation: 'complete' | 'renew' | 'release' }
  /** `rolled-back`: transactional mode, the completion failed and nothing of the handler's committed. */
  | { readonly type: 'released'; readonly key: string; readonly reason: AbandonReason | 'rolled-back' }
  | { readonly type: 'store-error'; readonly key: string | null; readonly operation: string; readonly error: unknown };

/** Minimal logger (console, pino and winston fit). */
export interface IdempotencyLogger {
  warn(message: string, ...meta: unknown[]): void;
  error(message: string, ...meta: unknown[]): void;
}

/** What a binding exposes to handlers about the running key (`req.idempotency`, `ctx.state.idempotency`). */
export interface IdempotencyContext {
  readonly key: string;
  readonly tookOver: boolean;
  /** With `transactional: true`: the driver client of the open transaction, else undefined. */
  readonly transaction: unknown;
}
