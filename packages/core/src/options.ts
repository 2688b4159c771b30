import { ConfigurationError } from './errors.js';
import type { IdempotencyStore } from './store.js';
import type { IdempotencyEvent, IdempotencyLogger, IncomingRequest } from './types.js';

/** A callback may answer at once or with a promise (`getKey`, `scope`, `fingerprint`). */
export type MaybePromise<T> = T | Promise<T>;

/**
 * Engine options. `Req` is whatever the caller hands to `decide()` next to the
 * `IncomingRequest`: the framework request in a binding, the arguments in `idempotent()`.
 */
export interface IdempotencyOptions<Req = IncomingRequest> {
  /** Where records live. Required. */
  store: IdempotencyStore;
  /** Methods that get idempotency; others pass through untouched. @default ['POST', 'PATCH'] */
  methods?: readonly string[] | undefined;
  /** Answer 400 when no key is sent. With false, keyless requests pass through. @default true */
  required?: boolean | undefined;
  /** Header carrying the key (case-insensitive). @default 'Idempotency-Key' */
  header?: string | undefined;
  /**
   * Body field read when the header is absent (the original design's `{ idempotencyKey }`),
   * or false to read the header only. @default 'idempotencyKey'
   */
  bodyField?: string | false | undefined;
  /** Custom key getter; replaces header and body lookup. Return undefined for "no key". */
  getKey?: ((req: Req, input: IncomingRequest) => MaybePromise<string | undefined>) | undefined;
  /** Extra key validation after the built-in rules; return false or a reason to reject (400). */
  validateKey?: ((key: string) => boolean | string) | undefined;
  /**
   * The tenant the key belongs to (user id, API key id). Part of the stored identity, so two
   * tenants sending the same key never see each other's responses. Without it, keys are global.
   */
  scope?: ((req: Req, input: IncomingRequest) => MaybePromise<string | number | bigint | undefined>) | undefined;
  /**
   * Request fingerprint for the 422 mismatch check. Default: SHA-256 over method, path with
   * query and canonical body. false disables the check. @default built-in
   */
  fingerprint?: (false | ((req: Req, input: IncomingRequest) => MaybePromise<string>)) | undefined;
  /** Which statuses are stored for replay. @default status < 500, except 408, 409, 425, 429 */
  storable?: ((status: number) => boolean) | undefined;
  /**
   * How long a completed response is replayed, in ms. Longer values and `Infinity` are capped at 100
   * years, the longest expiry every store can hold as a date. @default 86_400_000 (24 h)
   */
  ttlMs?: number | undefined;
  /** Lease of a running handler in ms; renewed every third of it while the handler runs. @default 60_000 */
  leaseMs?: number | undefined;
  /** Largest response body stored, in bytes; larger ones are never replayed nor re-run. @default 1_048_576 */
  maxBodyBytes?: number | undefined;
  /** A duplicate that arrives while the first still runs: 409 at once, or wait (bounded) and replay. @default 'conflict' */
  concurrency?: 'conflict' | 'wait' | undefined;
  /** With `concurrency: 'wait'`, how long to wait before answering 409. @default 10_000 */
  waitTimeoutMs?: number | undefined;
  /** Store failure: 'fail' answers 503; 'pass' runs the handler without idempotency. @default 'fail' */
  onStoreError?: 'fail' | 'pass' | undefined;
  /** A store call slower than this counts as a store failure, in ms. @default 5_000 */
  storeTimeoutMs?: number | undefined;
  /**
   * Run the handler inside a store transaction whose commit also stores the response (stores
   * that implement `TransactionalStore`, e.g. Postgres). @default false
   */
  transactional?: boolean | undefined;
  /**
   * Also keep completed answers in this process and replay them without asking the store, so a
   * retry storm on one key costs the store nothing. An entry lives `maxAgeMs` at most, never past
   * the record's own expiry (`ttlMs`); at most `maxEntries` answers of up to `maxEntryBytes` each
   * are kept (the one replayed least recently goes first). A record deleted from the store by
   * hand is still replayed here until its entry ends. `true` for the defaults (1 000 entries of
   * up to 64 KiB, 60 s). @default false
   */
  localCache?: boolean | LocalCacheOptions | undefined;
  /** Every engine event, for logs and metrics. Errors thrown here are ignored. */
  onEvent?: ((event: IdempotencyEvent) => void) | undefined;
  /** Where warnings go (lost leases, store errors). false silences them. @default console */
  logger?: IdempotencyLogger | false | undefined;
}

/** The `localCache` option's settings. */
export interface LocalCacheOptions {
  /** Answers kept at most; the one replayed least recently goes first. @default 1_000 */
  maxEntries?: number | undefined;
  /** How long an answer is replayed from this process at most, in ms. @default 60_000 */
  maxAgeMs?: number | undefined;
  /** Answers larger than this, body and headers, are not kept (they are replayed from the store). @default 65_536 */
  maxEntryBytes?: number | undefined;
}

export interface ResolvedOptions<Req = IncomingRequest> {
  readonly store: IdempotencyStore;
  readonly methods: ReadonlySet<string>;
  readonly required: boolean;
  readonly header: string;
  readonly bodyField: string | false;
  readonly getKey: IdempotencyOptions<Req>['getKey'];
  readonly validateKey: IdempotencyOptions<Req>['validateKey'];
  readonly scope: IdempotencyOptions<Req>['scope'];
  readonly fingerprint: false | ((req: Req, input: IncomingRequest) => MaybePromise<string>) | 'default';
  readonly storable: (status: number) => boolean;
  readonly ttlMs: number;
  readonly leaseMs: number;
  readonly maxBodyBytes: number;
  readonly concurrency: 'conflict' | 'wait';
  readonly waitTimeoutMs: number;
  readonly onStoreError: 'fail' | 'pass';
  readonly storeTimeoutMs: number;
  readonly transactional: boolean;
  readonly localCache: { readonly maxEntries: number; readonly maxAgeMs: number; readonly maxEntryBytes: number } | null;
  readonly onEvent: ((event: IdempotencyEvent) => void) | undefined;
  readonly logger: IdempotencyLogger | undefined;
}

/** Statuses that are never stored: a retry must be able to run again (SPEC §2). */
const UNSTORABLE = new Set([408, 409, 425, 429]);

/** SPEC §2: every status below 500 except 408, 409, 425 and 429 (and nothing under 200: no real answer). */
export function defaultStorable(status: number): boolean {
  return status >= 200 && status < 500 && !UNSTORABLE.has(status);
}

export const DEFAULTS = Object.freeze({
  methods: Object.freeze(['POST', 'PATCH']) as readonly string[],
  required: true,
  header: 'Idempotency-Key',
  bodyField: 'idempotencyKey' as string | false,
  ttlMs: 86_400_000,
  leaseMs: 60_000,
  maxBodyBytes: 1_048_576,
  concurrency: 'conflict' as 'conflict' | 'wait',
  waitTimeoutMs: 10_000,
  onStoreError: 'fail' as 'fail' | 'pass',
  storeTimeoutMs: 5_000,
  transactional: false,
  localCache: Object.freeze({ maxEntries: 1_000, maxAgeMs: 60_000, maxEntryBytes: 65_536 }),
});

const KNOWN = new Set([
  'store', 'methods', 'required', 'header', 'bodyField', 'getKey', 'validateKey', 'scope',
  'fingerprint', 'storable', 'ttlMs', 'leaseMs', 'maxBodyBytes', 'concurrency', 'waitTimeoutMs',
  'onStoreError', 'storeTimeoutMs', 'transactional', 'localCache', 'onEvent', 'logger',
]);

/** Node's timers hold at most this (about 24.8 days); a longer delay fires after 1 ms instead. */
export const MAX_TIMER_MS = 2_147_483_647;

/**
 * The longest `ttlMs`: 100 years. Stores write the expiry as a date, and a JavaScript Date ends in
 * the year 275760: `ttlMs: Number.MAX_SAFE_INTEGER` (meant as "forever") made MongoDB's
 * `new Date(now + ttlMs)` an Invalid Date, stored as 1970, so every answer was expired at once and
 * every retry ran the handler again.
 */
export const MAX_TTL_MS = 3_155_760_000_000;

/**
 * A longer `ttlMs`, or `Infinity`, means "keep it as long as you can": capped at 100 years rather
 * than refused, so a config written for "forever" keeps working (and keeps replaying).
 */
function ttl(value: number | undefined): number {
  if (value === Number.POSITIVE_INFINITY) return MAX_TTL_MS;
  return Math.min(positiveInt('ttlMs', value, DEFAULTS.ttlMs), MAX_TTL_MS);
}

function positiveInt(name: string, value: number | undefined, fallback: number, max = Number.MAX_SAFE_INTEGER, limit = "ms (a Node timer's limit)"): number {
  if (value === undefined) return fallback;
  if (!Number.isSafeInteger(value) || value <= 0) {
    // JSON: a string from process.env shows its quotes ("1000"), so the mistake is visible.
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', `\`${name}\` must be a positive integer, got ${describe(value)}.`);
  }
  if (value > max) {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', `\`${name}\` must be at most ${max} ${limit}, got ${value}.`);
  }
  return value;
}

function describe(value: unknown): string {
  return typeof value === 'number' ? String(value) : (JSON.stringify(value) ?? typeof value);
}

function bool(name: string, value: boolean | undefined, fallback: boolean): boolean {
  if (value === undefined) return fallback;
  if (typeof value !== 'boolean') {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', `\`${name}\` must be true or false, got ${describe(value)}.`);
  }
  return value;
}

/** `false`, or something with `warn` and `error` methods: a bad logger would silence every warning. */
function loggerOption(value: IdempotencyLogger | false | undefined): IdempotencyLogger | undefined {
  if (value === false) return undefined;
  if (value === undefined) return guarded(console);
  const l = value as Partial<Record<'warn' | 'error', unknown>> | null;
  if (typeof l !== 'object' || l === null || typeof l.warn !== 'function' || typeof l.error !== 'function') {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', '`logger` must be false or an object with `warn` and `error` methods (e.g. `console`, a pino logger).');
  }
  return guarded(value);
}

/** An optional callback option: `undefined`, or a function (else a ConfigurationError naming it). Bindings check theirs with it too. */
export function optionalFunction<T>(name: string, value: T | undefined): T | undefined {
  if (value !== undefined && typeof value !== 'function') {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', `\`${name}\` must be a function.`);
  }
  return value;
}

function oneOf<T extends string>(name: string, value: T | undefined, allowed: readonly T[], fallback: T): T {
  if (value === undefined) return fallback;
  if (!allowed.includes(value)) {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', `\`${name}\` must be one of ${allowed.map((a) => `'${a}'`).join(', ')}, got ${JSON.stringify(value)}.`);
  }
  return value;
}

function isStore(value: unknown): value is IdempotencyStore {
  if (typeof value !== 'object' || value === null) return false;
  const s = value as Record<string, unknown>;
  return ['begin', 'complete', 'release', 'renew', 'get', 'purgeExpired', 'close'].every((m) => typeof s[m] === 'function');
}

/** Drop undefined → apply defaults → validate → freeze. Throws `ConfigurationError` naming the option. */
export function resolveOptions<Req>(input: IdempotencyOptions<Req>): ResolvedOptions<Req> {
  if (typeof input !== 'object' || input === null) {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', 'Options must be an object with at least `store`.');
  }
  if (input.store === undefined) {
    throw new ConfigurationError('ERR_IDEMKIT_STORE_MISSING', 'Missing required option `store` (e.g. `createMemoryStore()`).');
  }
  if (!isStore(input.store)) {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', '`store` must implement IdempotencyStore (begin, complete, release, renew, get, purgeExpired, close).');
  }
  const logger = loggerOption(input.logger);
  const unknown = Object.keys(input).filter((k) => !KNOWN.has(k));
  if (unknown.length > 0) logger?.warn(`[idemkit] Unknown option(s) ignored: ${unknown.join(', ')}.`);

  const methods = input.methods ?? DEFAULTS.methods;
  if (!Array.isArray(methods) || methods.some((m) => typeof m !== 'string' || m === '')) {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', '`methods` must be an array of method names.');
  }
  // No method would be covered: every request would pass unprotected, with nothing to say so.
  if (methods.length === 0) {
    throw new ConfigurationError(
      'ERR_IDEMKIT_OPTION_INVALID',
      "`methods` is empty, so no request would be covered. To leave a route alone, give it `config: { idempotency: false }` (Fastify) or do not mount the middleware on it.",
    );
  }
  const header = input.header ?? DEFAULTS.header;
  if (typeof header !== 'string' || !/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(header)) {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', '`header` must be a valid header name.');
  }
  const bodyField = input.bodyField ?? DEFAULTS.bodyField;
  if (bodyField !== false && (typeof bodyField !== 'string' || bodyField === '')) {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', '`bodyField` must be a non-empty string or false.');
  }
  const fingerprint = input.fingerprint === undefined ? 'default' : input.fingerprint;
  if (fingerprint !== false && fingerprint !== 'default' && typeof fingerprint !== 'function') {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', '`fingerprint` must be a function or false.');
  }
  const transactional = bool('transactional', input.transactional, DEFAULTS.transactional);
  if (transactional && typeof (input.store as Partial<{ beginTransaction: unknown }>).beginTransaction !== 'function') {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', '`transactional: true` needs a store with transactions (e.g. @idemkit/postgres).');
  }
  const onStoreError = oneOf('onStoreError', input.onStoreError, ['fail', 'pass'], DEFAULTS.onStoreError);
  // 'pass' runs the handler without the store, so without a transaction: pgTransaction() then
  // throws, and every store blip became a 500 saying the request had no key (as
  // idempotentTransaction() refuses it too).
  if (transactional && onStoreError === 'pass') {
    throw new ConfigurationError(
      'ERR_IDEMKIT_OPTION_INVALID',
      "`onStoreError: 'pass'` cannot go with `transactional: true`: without the store there is no transaction for the handler to run in. Use 'fail' (a 503 the client retries).",
    );
  }
  const leaseMs = positiveInt('leaseMs', input.leaseMs, DEFAULTS.leaseMs, MAX_TIMER_MS);
  const maxBodyBytes = positiveInt('maxBodyBytes', input.maxBodyBytes, DEFAULTS.maxBodyBytes);
  const storeLimit = (input.store as Partial<Pick<IdempotencyStore, 'maxResponseBytes'>>).maxResponseBytes;
  if (typeof storeLimit === 'number' && maxBodyBytes > storeLimit) {
    throw new ConfigurationError(
      'ERR_IDEMKIT_OPTION_INVALID',
      `\`maxBodyBytes\` (${maxBodyBytes}) is more than this store can keep in one record (${storeLimit} bytes): an answer that size would never be stored, and its retries would run the handler again. Set \`maxBodyBytes\` to ${storeLimit} or less (larger answers then get the 410 too-large marker).`,
    );
  }

  const storeTimeoutMs = positiveInt('storeTimeoutMs', input.storeTimeoutMs, DEFAULTS.storeTimeoutMs, MAX_TIMER_MS);
  // Not refused: tests and demos shorten leases on purpose. But a lease that a store call may
  // outlast (or `leaseMs: 10` meant as seconds) lets another request take the key over while
  // its holder still runs.
  if (leaseMs < storeTimeoutMs) {
    logger?.warn(
      `[idemkit] \`leaseMs\` (${leaseMs} ms) is shorter than \`storeTimeoutMs\` (${storeTimeoutMs} ms): a renewal may answer after the lease ran out, and another request then takes the key over while this one still runs (a second run). Both are in milliseconds; keep leaseMs well above storeTimeoutMs.`,
    );
  }

  return Object.freeze({
    store: input.store,
    methods: new Set(methods.map((m) => m.toUpperCase())),
    required: bool('required', input.required, DEFAULTS.required),
    header,
    bodyField,
    getKey: optionalFunction('getKey', input.getKey),
    validateKey: optionalFunction('validateKey', input.validateKey),
    scope: optionalFunction('scope', input.scope),
    fingerprint,
    storable: optionalFunction('storable', input.storable) ?? defaultStorable,
    ttlMs: ttl(input.ttlMs),
    leaseMs,
    maxBodyBytes,
    concurrency: oneOf('concurrency', input.concurrency, ['conflict', 'wait'], DEFAULTS.concurrency),
    waitTimeoutMs: positiveInt('waitTimeoutMs', input.waitTimeoutMs, DEFAULTS.waitTimeoutMs, MAX_TIMER_MS),
    onStoreError,
    storeTimeoutMs,
    transactional,
    localCache: localCache(input.localCache),
    onEvent: optionalFunction('onEvent', input.onEvent),
    logger,
  });
}

function localCache(input: IdempotencyOptions['localCache']): ResolvedOptions['localCache'] {
  if (input === undefined || input === false) return null;
  if (input === true) return DEFAULTS.localCache;
  const known = Object.keys(DEFAULTS.localCache);
  if (typeof input !== 'object' || input === null || Array.isArray(input) || Object.keys(input).some((name) => !known.includes(name))) {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', `\`localCache\` must be true, false or an object of ${known.join(', ')}.`);
  }
  return Object.freeze({
    maxEntries: positiveInt('localCache.maxEntries', input.maxEntries, DEFAULTS.localCache.maxEntries),
    maxAgeMs: positiveInt('localCache.maxAgeMs', input.maxAgeMs, DEFAULTS.localCache.maxAgeMs),
    maxEntryBytes: positiveInt('localCache.maxEntryBytes', input.maxEntryBytes, DEFAULTS.localCache.maxEntryBytes),
  });
}

/**
 * A logger that cannot throw: it is called from timers (renewals, background completions), where
 * a throwing log sink (a transport that is down) would be an unhandled rejection that ends the
 * process. Like a throwing `onEvent`, it must never change what the client gets.
 */
function guarded(logger: IdempotencyLogger): IdempotencyLogger {
  return {
    warn(message, ...meta) {
      try {
        swallow(logger.warn(message, ...meta));
      } catch {
        // Nothing to tell it with.
      }
    },
    error(message, ...meta) {
      try {
        swallow(logger.error(message, ...meta));
      } catch {
        // Nothing to tell it with.
      }
    },
  };
}

/** An async logger or `onEvent` (typed as returning nothing) may still reject: never unhandled. */
export function swallow(result: unknown): void {
  if (typeof result === 'object' && result !== null && typeof (result as { then?: unknown }).then === 'function') {
    (result as PromiseLike<unknown>).then(undefined, () => undefined);
  }
}
