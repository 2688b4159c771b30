import {
  fingerprintMismatch,
  KeyError,
  requestInProgress,
  retryAfterSeconds,
  StoreUnavailableError,
  type IdempotencyError,
} from './errors.js';
import { defaultFingerprint, fingerprintsDiffer } from './fingerprint.js';
import { isJobRecord } from './headers.js';
import { hasBodyField, parseKeyHeader, scopedKey, validateKey, type KeyParseResult } from './key.js';
import { RenewalClock, RunningLease } from './lease.js';
import { upperMethod } from './method.js';
import { resolveOptions, swallow, type IdempotencyOptions, type ResolvedOptions } from './options.js';
import { ReplayCache } from './replay-cache.js';
import type { BeginResult, LeaseToken, StoredResponse, StoreTransaction, TransactionalStore } from './store.js';
import type { Decision, IdempotencyEvent, IncomingRequest } from './types.js';
import { watchClose, type StoreCloseWatch } from './store-close.js';
import { sleep, storeCaller, StoreTimeoutError, type StoreCall } from './deadline.js';

export interface IdempotencyEngine<Req = IncomingRequest> {
  readonly options: ResolvedOptions<Req>;
  /**
   * Decide what to do with one operation: pass, replay, answer a problem, or run under a lease.
   * Rejects only when a user callback (getKey, scope, fingerprint) throws.
   */
  decide(input: IncomingRequest, req?: Req): Promise<Decision>;
  /** Whether a response with this status would be stored. */
  isStorable(status: number): boolean;
}

const PASS: Decision = Object.freeze({ kind: 'pass' });
const WAIT_FIRST_MS = 25;
const WAIT_MAX_MS = 500;
/** A failing store is logged at most this often; each failure is still an event (`onEvent`). */
const STORE_ERROR_LOG_EVERY_MS = 10_000;

type KeyLookup = KeyParseResult | { readonly ok: 'none' };

/** Build the framework-free engine every binding (and `idempotent()`) runs on. */
export function createIdempotencyEngine<Req = IncomingRequest>(options: IdempotencyOptions<Req>): IdempotencyEngine<Req> {
  return new Engine(resolveOptions(options), false);
}

/**
 * The engine of `idempotent()` (not exported from the package): its calls always have a
 * fingerprint, and a record stored without one (an HTTP route with `fingerprint: false` on the
 * same store and key) is another writer's, so a mismatch, never a result to replay as the job's.
 */
export function createJobEngine<Req>(options: IdempotencyOptions<Req>): IdempotencyEngine<Req> {
  return new Engine(resolveOptions(options), true);
}

class Engine<Req> implements IdempotencyEngine<Req> {
  readonly #headerLower: string;
  /** Says every place a key may come from, so a client sending it in the body is not misled. */
  readonly #missingKey: string;
  readonly renewals: RenewalClock;
  readonly call: StoreCall;
  readonly storeClosed: StoreCloseWatch;
  /** When a failed begin was last logged, and how many were not logged since. */
  #storeErrorLoggedAt = -Infinity;
  #storeErrorsUnlogged = 0;
  /** Completed answers kept in process (`localCache`), else null. */
  readonly #cache: ReplayCache | null;

  constructor(
    readonly options: ResolvedOptions<Req>,
    /**
     * A job engine (see createJobEngine): a stored record without a fingerprint differs from its
     * calls, and its `path` (the job's name) is fingerprinted as it is, not as a request target.
     */
    readonly strictFingerprint: boolean,
  ) {
    this.#headerLower = options.header.toLowerCase();
    this.#missingKey = options.getKey
      ? 'This request needs an idempotency key.'
      : options.bodyField === false
        ? `This request needs an ${options.header} header.`
        : `This request needs an ${options.header} header (or an \`${options.bodyField}\` field in its JSON body).`;
    this.renewals = new RenewalClock(options.leaseMs);
    this.call = storeCaller(options.store, options.storeTimeoutMs);
    this.storeClosed = watchClose(options.store);
    this.#cache = options.localCache && new ReplayCache(options.localCache);
    // `=== false`: a store written in JavaScript without the field is not taken for the memory store.
    if (options.store.shared === false && process.env.NODE_ENV === 'production') {
      options.logger?.warn(
        '[idemkit] The in-memory store keeps records in this process only: with several processes or restarts, retries can run twice. Use a shared store (Postgres, Redis, MongoDB) in production.',
      );
    }
  }

  isStorable(status: number): boolean {
    return this.options.storable(status);
  }

  /**
   * A lease's answer was stored: keep it for replays from this process too (`localCache`). Its
   * TTL is counted from `sentAt`, when the completion was sent: the store began it no earlier.
   */
  remember(id: string, fingerprint: string | null, response: StoredResponse, sentAt: number): void {
    this.#cache?.set(id, fingerprint, response, this.options.ttlMs - (performance.now() - sentAt));
  }

  /** Whether a stored record belongs to another operation than one with `ours`. */
  differs(ours: string | null, stored: string | null): boolean {
    return this.strictFingerprint ? ours !== stored : fingerprintsDiffer(ours, stored);
  }

  emit(event: IdempotencyEvent): void {
    try {
      swallow(this.options.onEvent?.(event));
    } catch {
      // A metrics hook must never change what the client gets.
    }
  }

  async decide(input: IncomingRequest, req: Req = input as unknown as Req): Promise<Decision> {
    const o = this.options;
    if (!o.methods.has(upperMethod(input.method))) return PASS;

    // Only a custom getKey can be async; the header path stays synchronous (one promise less per request).
    const found = o.getKey ? await this.#customKey(input, req) : this.#headerKey(input);
    if (found.ok === 'none') {
      return o.required ? problem(new KeyError('ERR_IDEMKIT_KEY_MISSING', 400, this.#missingKey)) : PASS;
    }
    if (!found.ok) return problem(new KeyError('ERR_IDEMKIT_KEY_INVALID', 400, found.reason));
    const key = found.key;

    const scope = o.scope ? scopeText(await o.scope(req, input)) : undefined;
    const fingerprint =
      o.fingerprint === false ? null : o.fingerprint === 'default' ? defaultFingerprint(input, this.strictFingerprint) : checkedText(await o.fingerprint(req, input), 'fingerprint', 'a string');

    return this.#claim(key, scopedKey(scope, key), fingerprint);
  }

  async #customKey(input: IncomingRequest, req: Req): Promise<KeyLookup> {
    const key = await this.options.getKey!(req, input);
    if (key === undefined || key === null) return { ok: 'none' };
    if (typeof key !== 'string') return { ok: false, reason: NOT_A_STRING };
    return this.#checked(validateKey(key));
  }

  #headerKey(input: IncomingRequest): KeyLookup {
    const header = input.headers[this.#headerLower];
    if (typeof header === 'string') return this.#checked(parseKeyHeader(header));
    if (header !== undefined && header.length > 1) {
      return { ok: false, reason: `Send exactly one ${this.options.header} header; this request has ${header.length}.` };
    }
    const first = header?.[0];
    if (first !== undefined) return this.#checked(parseKeyHeader(first));
    const fromBody = this.#bodyKey(input.body);
    return fromBody === undefined ? { ok: 'none' } : this.#checked(fromBody);
  }

  /** Apply the user's `validateKey` to a key the built-in rules accepted. */
  #checked(result: KeyParseResult): KeyParseResult {
    const { validateKey: custom } = this.options;
    if (!result.ok || !custom) return result;
    const verdict: unknown = custom(result.key);
    if (verdict === true) return result;
    // An async validator's Promise is never `true`: every key was refused with a 400 that named no
    // cause. A server bug, so a 500 with this message in the log, as for `scope` and `fingerprint`.
    if (typeof (verdict as { then?: unknown } | null)?.then === 'function') {
      throw new TypeError('[idemkit] `validateKey` returned a Promise; it must return true, false or a reason synchronously. Check keys asynchronously in `getKey` instead.');
    }
    return { ok: false, reason: typeof verdict === 'string' && verdict !== '' ? verdict : 'The key was rejected by the server’s key rules.' };
  }

  #bodyKey(body: unknown): KeyParseResult | undefined {
    const field = this.options.bodyField;
    if (field === false || !hasBodyField(body, field)) return undefined;
    const value = (body as Record<string, unknown>)[field];
    if (typeof value !== 'string') return { ok: false, reason: `The body field \`${field}\` must be a string.` };
    return validateKey(value);
  }

  async #claim(key: string, id: string, fingerprint: string | null): Promise<Decision> {
    const o = this.options;
    const cached = this.#cache?.get(id);
    if (cached) return this.#completed(key, id, fingerprint, cached.fingerprint, cached.response, null);
    const deadline = performance.now() + o.waitTimeoutMs;
    let delay = WAIT_FIRST_MS;
    /** Seconds left on the running request's lease, once this call has seen one (waiting). */
    let seenRunning: number | undefined;
    for (;;) {
      let result: BeginResult;
      let pending: Promise<BeginResult> | undefined;
      const beganAt = performance.now();
      try {
        result = await this.call('begin', () => (pending = o.store.begin(id, fingerprint, o.leaseMs)));
      } catch (error) {
        // A begin that timed out may still land (a client replays queued commands on reconnect):
        // give such a late claim back, or the key would answer 409 for a whole lease.
        if (error instanceof StoreTimeoutError && pending) void pending.then((late) => (late.kind === 'acquired' ? o.store.release(id, late.token) : false)).catch(() => false);
        // This call saw the key running elsewhere: 'pass' must not run it a second time beside
        // that request, so a store that fails while it waits answers 409, as not waiting would.
        if (seenRunning !== undefined && o.onStoreError === 'pass') {
          this.#storeFailure(key, 'begin', error, false);
          return this.#conflict(key, seenRunning);
        }
        return this.#storeFailure(key, 'begin', error);
      }
      // The store answered after the whole lease had passed (it did not answer within leaseMs):
      // another process may already have taken the key over, so running the handler could run it
      // twice. Give the claim back.
      if (result.kind === 'acquired' && performance.now() - beganAt >= o.leaseMs) {
        const token = result.token;
        void this.call('release', () => o.store.release(id, token)).catch(() => false);
        // Never 'pass' here: the key was just given back, so a run now could be run again by a
        // retry (or beside the request that took the key over).
        const failed = this.#storeFailure(key, 'begin', new StoreTimeoutError('begin', o.leaseMs), false);
        return seenRunning === undefined ? failed : this.#conflict(key, seenRunning);
      }
      if (this.#storeErrorsUnlogged !== 0) this.#storeAnswersAgain();
      if (result.kind === 'acquired') {
        return o.transactional
          ? this.#runInTransaction(key, id, result.token, result.tookOver, beganAt, fingerprint)
          : this.#run(key, id, result.token, result.tookOver, beganAt, undefined, fingerprint);
      }

      const { record } = result;
      if (this.differs(fingerprint, record.fingerprint)) {
        this.emit({ type: 'mismatch', key });
        return problem(fingerprintMismatch());
      }
      if (record.state === 'completed' && record.response !== null) {
        return this.#completed(key, id, fingerprint, record.fingerprint, record.response, record.expiresAt);
      }
      // Still running elsewhere: wait (bounded, with backoff) or answer 409 at once.
      seenRunning = result.leaseRemainingMs;
      // The last sleep is cut to what is left, so the final look comes at the deadline, not up
      // to one backoff step (500 ms) before it.
      const left = deadline - performance.now();
      if (o.concurrency === 'wait' && left > 0) {
        await sleep(Math.max(1, Math.min(delay, left, result.leaseRemainingMs)));
        delay = Math.min(delay * 2, WAIT_MAX_MS);
        continue;
      }
      return this.#conflict(key, result.leaseRemainingMs);
    }
  }

  /**
   * The replay of a completed answer, from the store (`expiresAt`, by the store's clock) or from
   * the local cache (null; its fingerprint not yet checked against this request's).
   */
  #completed(key: string, id: string, fingerprint: string | null, stored: string | null, response: StoredResponse, expiresAt: number | null): Decision {
    // A route with `fingerprint: false` (null) takes any record for its own, but never a job's
    // (a webhook route and the job it enqueues, keyed by one event id): its result or its 410
    // "already ran" marker would go out as this route's answer.
    if (fingerprint === null && isJobRecord(response)) {
      this.emit({ type: 'mismatch', key });
      return problem(fingerprintMismatch());
    }
    if (expiresAt === null) {
      if (this.differs(fingerprint, stored)) {
        this.emit({ type: 'mismatch', key });
        return problem(fingerprintMismatch());
      }
    } else if (this.#cache && expiresAt - Date.now() > 2 * this.#cache.maxAgeMs) {
      // Its expiry is by the store's clock, so only far from it: this process's clock may be off
      // by more than the margin left near the end, and the copy would outlive the record.
      this.#cache.set(id, stored, response, this.#cache.maxAgeMs);
    }
    if (this.options.onEvent) this.emit({ type: 'replayed', key, status: response.status });
    return { kind: 'replay', key, response };
  }

  /**
   * The store answers again: say how many failures the throttle kept out of the log, once the
   * 10 s since the last line have passed (a flapping store must not log every other request).
   */
  #storeAnswersAgain(): void {
    const now = performance.now();
    if (now - this.#storeErrorLoggedAt < STORE_ERROR_LOG_EVERY_MS) return;
    const more = this.#storeErrorsUnlogged;
    this.#storeErrorsUnlogged = 0;
    this.#storeErrorLoggedAt = now;
    this.options.logger?.warn(`[idemkit] The store answers again; ${more} more store failure${more === 1 ? ' was' : 's were'} not logged (see the store-error events).`);
  }

  #conflict(key: string, leaseRemainingMs: number): Decision {
    const seconds = retryAfterSeconds(leaseRemainingMs);
    this.emit({ type: 'conflict', key, retryAfterSeconds: seconds });
    return problem(
      requestInProgress(seconds, 'A request with this key is still being processed. Retry after the time in Retry-After to get its result.'),
    );
  }

  async #runInTransaction(key: string, id: string, token: LeaseToken, tookOver: boolean, beganAt: number, fingerprint: string | null): Promise<Decision> {
    const o = this.options;
    let tx: StoreTransaction;
    let pending: Promise<StoreTransaction> | undefined;
    try {
      tx = await this.call('beginTransaction', () => (pending = (o.store as TransactionalStore).beginTransaction()));
    } catch (error) {
      // A transaction that opens after its deadline holds a pooled connection nobody will use:
      // roll it back when it lands, or a burst on a full pool leaks the pool away for good.
      if (error instanceof StoreTimeoutError && pending) void pending.then((late) => late.rollback()).catch(() => undefined);
      // Free the key we just took: nothing ran, so a retry must be able to run. Under the
      // deadline too: on a pool that is out of connections this would otherwise wait forever.
      await this.call('release', () => o.store.release(id, token)).catch(() => undefined);
      return this.#storeFailure(key, 'beginTransaction', error);
    }
    return this.#run(key, id, token, tookOver, beganAt, tx, fingerprint);
  }

  #run(key: string, id: string, token: LeaseToken, tookOver: boolean, beganAt: number, tx: StoreTransaction | undefined, fingerprint: string | null): Decision {
    const o = this.options;
    if (tookOver) {
      this.emit({ type: 'lease-taken-over', key });
      o.logger?.warn(`[idemkit] Took over the expired lease of key "${key}": its previous holder stopped renewing (crashed or stalled).`);
    }
    if (o.onEvent) this.emit({ type: 'executed', key, tookOver });
    return { kind: 'run', lease: new RunningLease(this, key, id, token, tookOver, tx, beganAt, fingerprint) };
  }

  /** A store call failed: the event, the (throttled) log, and the 503, or PASS when `canPass` and 'pass'. */
  #storeFailure(key: string, operation: string, error: unknown, canPass = true): Decision {
    this.emit({ type: 'store-error', key, operation, error });
    // One line with a stack per failed request flooded the log in an outage: one every 10 s,
    // with the count of those not logged in between.
    const now = performance.now();
    if (now - this.#storeErrorLoggedAt < STORE_ERROR_LOG_EVERY_MS) this.#storeErrorsUnlogged++;
    else {
      const more = this.#storeErrorsUnlogged;
      const since = more === 0 ? '' : ` (${more} more store failure${more === 1 ? '' : 's'} since the last one logged)`;
      this.#storeErrorLoggedAt = now;
      this.#storeErrorsUnlogged = 0;
      const passing = canPass && this.options.onStoreError === 'pass' ? ' (onStoreError: \'pass\': such requests run without idempotency; every key is in its store-error event)' : '';
      this.options.logger?.error(`[idemkit] Store ${operation} failed for key "${key}"${since}; not logged again for ${STORE_ERROR_LOG_EVERY_MS / 1000} s${passing}.`, error);
    }
    if (canPass && this.options.onStoreError === 'pass') return PASS;
    return problem(
      new StoreUnavailableError(
        'ERR_IDEMKIT_STORE_UNAVAILABLE',
        503,
        STORE_DOWN_TEXT,
        { cause: error },
      ),
    );
  }
}

function problem(error: IdempotencyError): Decision {
  return { kind: 'problem', error };
}

/** A user id is often a number: taken as its decimal text, so 42 and '42' are one tenant. */
function scopeText(value: unknown): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value === 'bigint' || (typeof value === 'number' && Number.isFinite(value))) return String(value);
  return checkedText(value, 'scope', 'a string, a finite number or a bigint, or undefined');
}

/**
 * A callback's string, refused when it is not one or holds text stores cannot keep: they encode
 * UTF-8, where every lone surrogate becomes U+FFFD, so two tenants' scopes could meet in one key
 * (and a fingerprint would never match itself again); Postgres text refuses NUL outright.
 */
function checkedText(value: unknown, option: 'scope' | 'fingerprint', expected: string): string {
  if (typeof value !== 'string') throw new TypeError(`[idemkit] \`${option}\` must return ${expected}.`);
  if (NOT_STORABLE_TEXT.test(value)) {
    throw new TypeError(
      `[idemkit] \`${option}\` returned a string with a lone surrogate or a NUL character, which stores cannot keep as they are; return well-formed text (hex or base64 for a binary digest).`,
    );
  }
  return value;
}

/** A lone surrogate (UTF-8 turns it into U+FFFD) or U+0000 (Postgres text refuses it). */
// eslint-disable-next-line no-control-regex -- NUL is exactly what this looks for.
export const NOT_STORABLE_TEXT = /\p{Surrogate}|\u0000/u;

/** The 503 a store failure before the handler gives; `idempotent()` says it for a call instead. */
export const STORE_DOWN_TEXT = 'The idempotency store is unavailable, so the request was not run. Retry with the same key.';

/** A custom `getKey` that returned something other than a string. */
export const NOT_A_STRING = 'The key must be a string.';
