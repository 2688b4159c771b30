import { webClass, withArticle } from './canonical-json.js';
import { createJobEngine, NOT_A_STRING, NOT_STORABLE_TEXT, STORE_DOWN_TEXT } from './engine.js';
import { JOB_RESULT_HEADER } from './headers.js';
import { RunningLease } from './lease.js';
import { ConfigurationError, FingerprintMismatchError, KeyError, requestInProgress, ResponseNotReplayableError, StoreUnavailableError, TransactionAbortedError } from './errors.js';
import { optionalFunction, type IdempotencyOptions } from './options.js';
import type { StoredResponse, TransactionalStore } from './store.js';
import type { Decision, IncomingRequest, Lease } from './types.js';

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export interface IdempotentOptions<Args extends unknown[], R>
  extends Pick<
    IdempotencyOptions<Args>,
    'store' | 'ttlMs' | 'leaseMs' | 'waitTimeoutMs' | 'onStoreError' | 'storeTimeoutMs' | 'maxBodyBytes' | 'localCache' | 'onEvent' | 'logger'
  > {
  /**
   * 'wait': a concurrent call with the same key waits for the first and gets its result (a
   * redelivered message); 'conflict': it rejects at once with `RequestInProgressError`.
   * @default 'wait'
   */
  concurrency?: 'conflict' | 'wait' | undefined;
  /**
   * The idempotency key of one call, from its arguments (e.g. the message id). Required. A finite
   * number or a bigint is taken as its decimal text (as `scope` takes it): `42` and `'42'` are one key.
   */
  key: (...args: Args) => string | number | bigint;
  /** Tenant of the call; part of the stored identity. */
  scope?: ((...args: Args) => string | number | bigint | undefined) | undefined;
  /** Job name, part of every stored fingerprint so two jobs sharing a key are told apart. Required when `fn` has no name. @default fn.name */
  name?: string | undefined;
  /**
   * Fingerprint of the arguments for the mismatch check, or false (check only that the key's
   * record is this job's, by `name`). @default SHA-256 of name + canonical JSON of the arguments
   */
  fingerprint?: false | ((...args: Args) => string) | undefined;
  /** Result → stored bytes. @default JSON */
  serialize?: ((result: R) => Uint8Array | string) | undefined;
  /** Stored bytes → result. @default JSON */
  deserialize?: ((bytes: Uint8Array) => R) | undefined;
}

/**
 * Options of {@link idempotentTransaction}: those of `idempotent()`, on a store with transactions
 * (`@idemkit/postgres`), whose driver client `Client` the job gets.
 */
export interface IdempotentTransactionOptions<Client, Args extends unknown[], R> extends Omit<IdempotentOptions<Args, R>, 'store' | 'onStoreError'> {
  store: TransactionalStore<Client>;
  /**
   * Only 'fail' (a call rejects with `StoreUnavailableError` when the store fails): `fn` runs in
   * the store's own transaction, so without the store there is nothing to run it in.
   * @default 'fail'
   */
  onStoreError?: 'fail' | undefined;
}

function defaultSerialize(result: unknown): string {
  return result === undefined ? '' : JSON.stringify(result, refuseLossy);
}

/**
 * The web classes a job that calls fetch() has at hand, whose data JSON cannot see either (it
 * writes each as `{}`): those this runtime has.
 */
const WEB_OPAQUE = ['Headers', 'URLSearchParams', 'FormData', 'Blob', 'Response', 'Request'].flatMap(webClass);

/** A job key as text: a database id is often a number (`key: (msg) => msg.orderId`). */
function keyText(key: string | number | bigint): string {
  // Anything else (an untyped caller's object, NaN) goes on as it is, for the engine to refuse.
  return typeof key === 'bigint' || (typeof key === 'number' && Number.isFinite(key)) ? String(key) : (key as string);
}

/**
 * JSON writes these as `{}` (an Error's message and stack are not enumerable; a Promise is a
 * missing `await`): every caller would get an empty object, so they are refused as a BigInt is.
 * A replacer sees a value after its `toJSON`, so an error class with one is stored by it.
 */
function refuseLossy(_key: string, value: unknown): unknown {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return value;
  const lost =
    value instanceof Map
      ? 'a Map'
      : value instanceof Set
        ? 'a Set'
        : value instanceof Error
          ? 'an Error'
          : typeof (value as { then?: unknown }).then === 'function'
            ? 'a Promise (a missing `await`?)'
            : value instanceof WeakMap || value instanceof WeakSet || value instanceof WeakRef || value instanceof RegExp || value instanceof ArrayBuffer || value instanceof DataView || WEB_OPAQUE.some((type) => value instanceof type)
              ? withArticle(value.constructor.name)
              : null;
  if (lost !== null) throw new TypeError(`JSON would store ${lost} as {}; return a plain object or array, or pass serialize/deserialize`);
  return value;
}

/** serialize's output as bytes; anything else (JSON.stringify of a function gives undefined) is refused. */
function toBytes(raw: unknown): Uint8Array {
  if (typeof raw === 'string') return encoder.encode(raw);
  if (raw instanceof Uint8Array) return raw;
  throw new TypeError(`serialize returned ${raw === null ? 'null' : typeof raw}, not a string or Uint8Array`);
}

function defaultDeserialize<R>(bytes: Uint8Array): R {
  return (bytes.byteLength === 0 ? undefined : JSON.parse(decoder.decode(bytes))) as R;
}

/**
 * Make a plain async function safe to retry (queue consumers, webhooks, cron jobs): for one key,
 * `fn` runs once and every later or concurrent call gets its stored result.
 *
 * Concurrent calls wait for the first (`concurrency: 'wait'` is the default here) and then get
 * its result; past `waitTimeoutMs` they reject with `RequestInProgressError`. A call whose
 * arguments differ from the first call's rejects with `FingerprintMismatchError`. If `fn` throws,
 * the key is released and the error is rethrown, so a retry runs again. Every caller, the first
 * included, gets the result as `deserialize(serialize(result))`, so all of them see the same value;
 * except a call that lost its lease while `fn` ran (it outlasted `leaseMs` without a renewal
 * getting through, and another call took the key over and ran `fn` too): it gets its own result,
 * which is not stored, and a `lease-lost` event says so. A call resolves once its result is stored:
 * a completion the store failed is retried first (see the README), with the process kept alive,
 * until it lands, the lease runs out, or the store is closed.
 */
// `This` last, so code that names <Args, R> explicitly, as before it was added, still compiles.
export function idempotent<Args extends unknown[], R, This = unknown>(
  fn: (this: This, ...args: Args) => R | Promise<R>,
  options: IdempotentOptions<Args, R>,
): (this: This, ...args: Args) => Promise<Awaited<R>> {
  const call = jobCaller<Args, R>(fn, options, false);
  return function (this: This, ...args: Args): Promise<Awaited<R>> {
    return call(args, () => fn.apply(this, args));
  };
}

/**
 * `idempotent()` with exactly-once database writes: `fn` gets the driver client of a transaction
 * the store opened (a `pg` `PoolClient` for `@idemkit/postgres`) as its first argument, and its
 * result is stored in that same transaction, so `fn`'s writes and the stored result commit
 * together or not at all. A worker that dies mid-job leaves nothing behind, and the call that
 * takes its key over runs `fn` on a clean slate. A call whose lease was taken over while `fn`
 * ran (a stall past `leaseMs`) has its writes rolled back and gets the result of the call that
 * took over (or `RequestInProgressError` while that one runs, `FingerprintMismatchError` when it
 * ran with other arguments, `StoreUnavailableError` when the outcome is unknown), never its own.
 * If `fn` throws, or its result cannot be serialised, its writes are rolled back and the key is
 * freed. `key`, `fingerprint` and `scope` get the arguments without the client.
 *
 * @example
 * ```ts
 * const charge = idempotentTransaction(
 *   async (tx, order: Order) => {
 *     await tx.query('INSERT INTO charges (order_id, cents) VALUES ($1, $2)', [order.id, order.cents]);
 *     return { charged: order.cents };
 *   },
 *   { store, name: 'charge', key: (order) => order.id },
 * );
 * await charge(order); // every redelivery of this order gets { charged: … }; one row, ever
 * ```
 */
export function idempotentTransaction<Client, Args extends unknown[], R, This = unknown>(
  fn: (this: This, transaction: Client, ...args: Args) => R | Promise<R>,
  options: IdempotentTransactionOptions<Client, Args, R>,
): (this: This, ...args: Args) => Promise<Awaited<R>> {
  const call = jobCaller<Args, R>(fn, options, true);
  return function (this: This, ...args: Args): Promise<Awaited<R>> {
    return call(args, (transaction) => fn.call(this, transaction as Client, ...args));
  };
}

type JobCall<Args extends unknown[], R> = (args: Args, invoke: (transaction: unknown) => R | Promise<R>) => Promise<Awaited<R>>;

/** The engine behind both wrappers: checks the options once, then decides and settles each call. */
function jobCaller<Args extends unknown[], R>(
  fn: unknown,
  options: IdempotentOptions<Args, R> | IdempotentTransactionOptions<unknown, Args, R>,
  transactional: boolean,
): JobCall<Args, R> {
  const wrapper = transactional ? 'idempotentTransaction' : 'idempotent';
  if (typeof fn !== 'function') throw new TypeError(`[idemkit] ${wrapper}(fn, options): \`fn\` must be a function.`);
  if (typeof options?.key !== 'function') throw new TypeError(`[idemkit] ${wrapper}(fn, options): \`key\` must be a function of the arguments.`);
  // Checked here, not left to the engine: it only ever sees the wrappers below, and a bad
  // `serialize` would otherwise surface after fn ran, settling the key on a marker for good.
  const scope = optionalFunction('scope', options.scope);
  const serialize = optionalFunction('serialize', options.serialize) ?? defaultSerialize;
  const deserialize = optionalFunction('deserialize', options.deserialize) ?? defaultDeserialize;
  if (options.fingerprint !== false && options.fingerprint !== undefined && typeof options.fingerprint !== 'function') {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', '`fingerprint` must be a function of the arguments, or false.');
  }
  if (transactional && options.onStoreError !== undefined && options.onStoreError !== 'fail') {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', "idempotentTransaction(): `onStoreError` can only be 'fail': fn runs in the store's transaction, so it cannot run without the store.");
  }
  // No fallback name for an anonymous function: two inline jobs on one store would share it, and
  // one meeting the other's key would get that job's result instead of running (or a mismatch).
  const name = options.name ?? (fn as { name?: string }).name;
  // `bound ` alone: an anonymous function bound with .bind(), as nameless as the function itself.
  if (options.name === undefined && typeof name === 'string' && /^(bound )*$/.test(name)) {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', `${wrapper}(fn, options): \`fn\` has no name (an inline arrow or anonymous function), so set \`name\`: it tells this job's records from other jobs' on the same store, and should stay the same across deploys.`);
  }
  if (typeof name !== 'string' || name === '') throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', '`name` must be a non-empty string.');
  // It goes into every stored fingerprint: caught at the first call instead, it was blamed on `fingerprint`.
  if (NOT_STORABLE_TEXT.test(name)) {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', `\`name\` ${JSON.stringify(name)} holds a NUL character or a lone surrogate, which stores cannot keep (Postgres refuses NUL; UTF-8 turns a lone surrogate into U+FFFD): use well-formed text.`);
  }
  const { key, fingerprint, scope: _scope, name: _name, serialize: _serialize, deserialize: _deserialize, ...rest } = options;
  // Jobs share the keys of one store, so the stored fingerprint always names the job: another
  // job meeting this key gets FingerprintMismatchError, never this job's result, whatever
  // `fingerprint` says. (Length-prefixed, so no name and fingerprint can run together.)
  const named = (fp: unknown): unknown => (typeof fp === 'string' ? `${name.length}:${name}:${fp}` : fp);
  const engine = createJobEngine<Args>({
    ...rest,
    transactional,
    // After the spread: `concurrency: undefined` (an unset setting) means this default, not core's.
    concurrency: rest.concurrency ?? 'wait',
    methods: ['CALL'],
    required: true,
    getKey: (args) => keyText(key(...args)),
    ...(scope ? { scope: (args: Args) => scope(...args) } : {}),
    ...(fingerprint === false
      ? { fingerprint: () => named('') as string }
      : fingerprint
        ? { fingerprint: (args: Args) => named(fingerprint(...args)) as string }
        : {}),
    // A job's result is always stored: there is no HTTP status to judge it by.
    storable: () => true,
  });
  const waits = (rest.concurrency ?? 'wait') === 'wait';
  /**
   * The engine's problems speak of requests, methods and Retry-After, which a job's caller never
   * sees: the same errors (class, code, `extensions.retryAfter`), said for a function call.
   */
  const forJob = (error: Error): Error => {
    const code = (error as { code?: unknown }).code;
    if (code === 'ERR_IDEMKIT_FINGERPRINT_MISMATCH') return jobMismatch(name);
    if (code === 'ERR_IDEMKIT_KEY_MISSING') {
      return new KeyError('ERR_IDEMKIT_KEY_MISSING', 400, `\`key\` returned no key (undefined or null) for this call of "${name}", so fn was not run.`);
    }
    if (code === 'ERR_IDEMKIT_KEY_INVALID') {
      // `keyText` has already turned a finite number or a bigint into text: say so, not "a string".
      const reason = error.message === NOT_A_STRING ? 'The key must be a string, a finite number or a bigint.' : error.message;
      return new KeyError('ERR_IDEMKIT_KEY_INVALID', 400, `\`key\` returned an unusable key for this call of "${name}", so fn was not run: ${reason}`);
    }
    // The store failed before fn ran (a begin or a wait that could not reach it): said for a call.
    if (code === 'ERR_IDEMKIT_STORE_UNAVAILABLE' && error.message === STORE_DOWN_TEXT) {
      return new StoreUnavailableError('ERR_IDEMKIT_STORE_UNAVAILABLE', 503, `The idempotency store is unavailable, so fn was not run for this call of "${name}". Retry the call (redeliver the message) with the same key.`, {
        cause: error.cause,
      });
    }
    if (code !== 'ERR_IDEMKIT_REQUEST_IN_PROGRESS') return error;
    const retryAfter = (error as { extensions?: { retryAfter?: unknown } }).extensions?.retryAfter;
    const seconds = typeof retryAfter === 'number' ? retryAfter : 1;
    return requestInProgress(
      seconds,
      `Another call of "${name}" with this key is still running, in this process or another` +
        // Not 'did not finish within waitTimeoutMs': a store failing while it waits also ends the wait here.
        `${waits ? `, and this call did not get its result (it waits at most waitTimeoutMs, ${engine.options.waitTimeoutMs} ms)` : ''}. ` +
        `Retry in ${seconds} s (err.extensions.retryAfter) to get its result.`,
    );
  };
  /** A stored (or replacement) answer as the call's result, or the error it stands for. */
  const resultOf = (response: StoredResponse): Awaited<R> => {
    if (response.status !== 200) throw answerError(response, name);
    return deserialize(response.body) as Awaited<R>;
  };

  return async (args, invoke): Promise<Awaited<R>> => {
    const input: IncomingRequest = { method: 'CALL', path: name, headers: {}, body: args };
    let decision: Decision;
    try {
      decision = await engine.decide(input, args);
    } catch (error) {
      // The default fingerprint's error speaks of a request body; a job's caller passed arguments.
      if (fingerprint === undefined && error instanceof TypeError && error.message.startsWith('[idemkit] Cannot fingerprint')) {
        const why = error.message.includes('contains itself')
          ? 'they contain themselves (a request, a driver client or a logger, say)'
          : `they hold ${/^\[idemkit\] Cannot fingerprint (.*?):/.exec(error.message)?.[1] ?? 'a value'}, whose data JSON cannot see`;
        throw new TypeError(
          `[idemkit] ${wrapper}(): the arguments of "${name}" cannot be fingerprinted: ${why}, so fn was not run. ` +
            'Pass `fingerprint` with what identifies the work, e.g. `(msg) => msg.id`.',
          { cause: error },
        );
      }
      throw error;
    }
    switch (decision.kind) {
      case 'pass': {
        // Nothing is stored (the store failed, onStoreError: 'pass'), but the caller still gets
        // the result as every other call does: a Date as its JSON text here and as a Date when the
        // store is up would break code written against the usual shape only in an outage.
        const result = (await invoke(undefined)) as Awaited<R>;
        try {
          return deserialize(toBytes(serialize(result))) as Awaited<R>;
        } catch (error) {
          // fn ran and nothing can stop it running again: a rejection here would have a queue
          // redeliver the message, and with the store still gone every redelivery runs fn (with
          // the store there, the 410 marker stops them). So the result is handed back as it is, and
          // the shape it could not be given is said in the log. A `deserialize` that cannot read
          // what `serialize` wrote likewise.
          engine.options.logger?.warn(
            `[idemkit] ${wrapper}(): "${name}" ran without idempotency (the store failed, onStoreError: 'pass'), and its result could not be serialised and read back ` +
              `(${error instanceof Error ? error.message : String(error)}): it is returned as fn gave it, not as a stored result would be. With the store up, a result serialize refuses is refused after fn ran ` +
              '(later calls reject with ResponseNotReplayableError). Return JSON-safe values, or pass `serialize` and `deserialize` that read back what they write.',
          );
          return result;
        }
      }
      case 'problem':
        throw forJob(decision.error);
      case 'replay':
        return resultOf(decision.response);
      case 'run': {
        const { lease } = decision;
        let result: Awaited<R>;
        try {
          result = (await invoke(lease.context.transaction)) as Awaited<R>;
        } catch (error) {
          await lease.abandon('handler-threw');
          // fn that ended its transaction itself leaves a 410 marker, not a free key: stored first.
          await storedOrGivenUp(lease);
          throw error;
        }
        let body: Uint8Array;
        try {
          body = toBytes(serialize(result));
        } catch (error) {
          const why = `fn ran, but its result could not be serialised (${error instanceof Error ? error.message : String(error)})`;
          const fix = 'Return JSON-safe values, or pass `serialize` and `deserialize`.';
          if (transactional) {
            // Nothing of fn's may commit without its result: roll back and free the key, as if fn threw.
            await lease.abandon('handler-threw');
            await storedOrGivenUp(lease);
            throw new TypeError(
              `[idemkit] ${wrapper}(): ${why}, so its transaction was rolled back and nothing was stored; a retry runs fn again ` +
                '(unless fn had ended the transaction itself: then what it committed stays, and later calls reject with ResponseNotReplayableError). ' +
                fix,
              { cause: error },
            );
          }
          // fn ran and must not run again for this key: settle the lease with a marker, so later
          // calls reject with ResponseNotReplayableError instead of waiting or running fn twice.
          await lease.commitUnbuffered(200, 'not-serializable');
          await storedOrGivenUp(lease);
          throw new TypeError(
            `[idemkit] ${wrapper}(): ${why}. It was not stored; later calls with this key reject with ResponseNotReplayableError instead of running fn again. ${fix}`,
            { cause: error },
          );
        }
        const { maxBodyBytes, logger } = engine.options;
        if (body.byteLength > maxBodyBytes) {
          // This caller gets its result; nothing else says it was not stored until a redelivery
          // meets the 410, maybe days later.
          logger?.warn(
            `[idemkit] ${wrapper}(): the result of "${name}" for key "${lease.key}" is ${body.byteLength} bytes serialised, over maxBodyBytes (${maxBodyBytes}): ` +
              "it was not stored, and later calls with this key reject with ResponseNotReplayableError (reason 'too-large') instead of running fn again. Raise maxBodyBytes, or return less (an id to fetch the rest by).",
          );
        }
        // The marker tells this record from a route's to a route with `fingerprint: false`.
        await lease.commit({ status: 200, headers: [[JOB_RESULT_HEADER, '1']], body });
        await storedOrGivenUp(lease);
        // Transactional only: the commit did not land (the lease was taken over, COMMIT failed),
        // so fn's writes are gone and its result describes nothing; the engine says what stands.
        if (lease.replacement) return resultOf(lease.replacement);
        return deserialize(body) as Awaited<R>;
      }
    }
  };
}

/**
 * A result whose completion the store failed is retried in the background (a blip, a failover).
 * A job's caller acks its message, or exits, once the call resolves: resolving before the result
 * is stored would let a process that exits next lose it, and the key's redelivery run `fn` again
 * once the lease ran out. So the call waits for that retry to end (it lands, the 410 marker does,
 * it gives up when the lease runs out, or the store is closed: nothing can land then), and keeps
 * the process alive meanwhile: the retry's own timers do not, so that a server shutting down is
 * not held by them. With `onStoreError: 'pass'` too: only a call whose `begin` got through waits
 * (one that failed ran `fn` without a lease), and for a blip at its completion the wait is what
 * keeps the result, so a redelivery after the store is back replays instead of running `fn` again.
 */
async function storedOrGivenUp(lease: Lease): Promise<void> {
  const pending = lease instanceof RunningLease ? lease.backgroundCompletion : null;
  if (pending === null) return;
  const alive = setInterval(() => undefined, 60_000);
  try {
    await pending;
  } finally {
    clearInterval(alive);
  }
}

/** The key's record is not this call's: the engine's 422, said for a job. */
function jobMismatch(name: string): FingerprintMismatchError {
  return new FingerprintMismatchError(
    'ERR_IDEMKIT_FINGERPRINT_MISMATCH',
    422,
    `This key was already used by a call of "${name}" with other arguments, or by another job or an HTTP route on the same store; fn was not run. ` +
      'Give each job and each piece of work its own key (e.g. `charge:${event.id}`), or fingerprint only what identifies the work (`fingerprint`).',
  );
}

/**
 * Results are stored with 200; any other stored answer is a problem: the marker of a result that
 * could not be stored (fn ran once: never hand the marker out as a result), or, replacing a
 * rolled-back transactional call's result, a 422 when a call with other arguments took the key
 * over, a 409 while the call that took over still runs, a 503 saying fn's own failed statement
 * aborted its transaction, or a 503 when the outcome is not known.
 */
function answerError(response: StoredResponse, name: string): Error {
  let problem: { detail?: unknown; retryAfter?: unknown; reason?: unknown } = {};
  try {
    problem = JSON.parse(decoder.decode(response.body)) as typeof problem;
  } catch {
    // Always JSON; if not, the messages below still say what happened.
  }
  const detail = typeof problem.detail === 'string' ? problem.detail : undefined;
  if (response.status === 422) return jobMismatch(name);
  if (response.status === 409) {
    const retryAfter = typeof problem.retryAfter === 'number' ? problem.retryAfter : 1;
    // The engine's detail speaks of requests and Retry-After; a job's caller knows neither.
    return requestInProgress(
      retryAfter,
      `fn outlasted its lease and another call took the key over; fn's writes were rolled back. That call still runs: retry in ${retryAfter} s to get its result.`,
    );
  }
  if (response.status === 503 && problem.reason === 'transaction-aborted') {
    return new TransactionAbortedError(
      'A statement fn ran had failed and aborted its transaction (fn caught it and returned): nothing was committed, and the key is free again. ' +
        'Put a SAVEPOINT around a statement that may fail, or use ON CONFLICT.',
    );
  }
  if (response.status === 503) {
    return new StoreUnavailableError('ERR_IDEMKIT_STORE_UNAVAILABLE', 503, detail ?? 'The outcome of this call is not known; retry it.');
  }
  // The marker's detail speaks of a request that answered 200 with a body; said for a job here.
  const why = JOB_MARKER_REASONS.get(problem.reason);
  return new ResponseNotReplayableError(
    'ERR_IDEMKIT_RESPONSE_NOT_REPLAYABLE',
    410,
    why === undefined
      ? (detail ?? `A call of "${name}" with this key already ran, but its result was not stored. fn is not run again for this key.`)
      : `A call of "${name}" with this key already ran, but ${why}, so it was not stored. fn is not run again for this key.`,
    { extensions: { reason: problem.reason } },
  );
}

/** Why a job's result was not stored, by the 410 marker's `reason`. */
const JOB_MARKER_REASONS: ReadonlyMap<unknown, string> = new Map([
  ['too-large', 'its serialised result was larger than maxBodyBytes'],
  ['not-serializable', 'its result could not be serialised'],
  ['store-refused', 'the store kept refusing to store its result'],
  ['transaction-ended', 'fn ended the database transaction it was given (COMMIT or ROLLBACK)'],
]);
