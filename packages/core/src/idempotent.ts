import { createIdempotencyEngine } from './engine.js';
import { ConfigurationError, ResponseNotReplayableError } from './errors.js';
import { optionalFunction, type IdempotencyOptions } from './options.js';
import type { IncomingRequest } from './types.js';

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export interface IdempotentOptions<Args extends unknown[], R>
  extends Pick<
    IdempotencyOptions<Args>,
    'store' | 'ttlMs' | 'leaseMs' | 'concurrency' | 'waitTimeoutMs' | 'onStoreError' | 'storeTimeoutMs' | 'maxBodyBytes' | 'onEvent' | 'logger'
  > {
  /** The idempotency key of one call, from its arguments (e.g. the message id). Required. */
  key: (...args: Args) => string;
  /** Tenant of the call; part of the stored identity. */
  scope?: ((...args: Args) => string | number | bigint | undefined) | undefined;
  /** Job name, part of every stored fingerprint so two jobs sharing a key are told apart. @default fn.name */
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

function defaultSerialize(result: unknown): string {
  return result === undefined ? '' : JSON.stringify(result);
}

/** serialize's output as bytes; anything else (JSON.stringify of a function gives undefined) is refused. */
function toBytes(raw: unknown): Uint8Array {
  if (typeof raw === 'string') return encoder.encode(raw);
  if (raw instanceof Uint8Array) return raw;
  throw new TypeError(`serialize returned ${raw === null ? 'null' : typeof raw}, not a string or Uint8Array`);
}

/** The stored marker (an RFC 9457 problem) as the error it stands for. */
function notReplayable(body: Uint8Array): ResponseNotReplayableError {
  let problem: { detail?: unknown; originalStatus?: unknown; reason?: unknown } = {};
  try {
    problem = JSON.parse(decoder.decode(body)) as typeof problem;
  } catch {
    // A marker is always JSON; if not, the generic message below still says what happened.
  }
  return new ResponseNotReplayableError(
    'ERR_IDEMKIT_RESPONSE_NOT_REPLAYABLE',
    410,
    typeof problem.detail === 'string' ? problem.detail : 'The call with this key already ran, but its result was not stored. It is not run again.',
    { extensions: { reason: problem.reason } },
  );
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
 * included, gets the result as `deserialize(serialize(result))`, so all of them see the same value.
 */
// `This` last, so code that names <Args, R> explicitly, as before it was added, still compiles.
export function idempotent<Args extends unknown[], R, This = unknown>(
  fn: (this: This, ...args: Args) => R | Promise<R>,
  options: IdempotentOptions<Args, R>,
): (this: This, ...args: Args) => Promise<Awaited<R>> {
  if (typeof fn !== 'function') throw new TypeError('[idemkit] idempotent(fn, options): `fn` must be a function.');
  if (typeof options?.key !== 'function') throw new TypeError('[idemkit] idempotent(fn, options): `key` must be a function of the arguments.');
  // Checked here, not left to the engine: it only ever sees the wrappers below, and a bad
  // `serialize` would otherwise surface after fn ran, settling the key on a marker for good.
  const scope = optionalFunction('scope', options.scope);
  const serialize = optionalFunction('serialize', options.serialize) ?? defaultSerialize;
  const deserialize = optionalFunction('deserialize', options.deserialize) ?? defaultDeserialize;
  if (options.fingerprint !== false && options.fingerprint !== undefined && typeof options.fingerprint !== 'function') {
    throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', '`fingerprint` must be a function of the arguments, or false.');
  }
  const name = options.name ?? (fn.name || 'job');
  if (typeof name !== 'string' || name === '') throw new ConfigurationError('ERR_IDEMKIT_OPTION_INVALID', '`name` must be a non-empty string.');
  const { key, fingerprint, scope: _scope, name: _name, serialize: _serialize, deserialize: _deserialize, ...rest } = options;
  // Jobs share the keys of one store, so the stored fingerprint always names the job: another
  // job meeting this key gets FingerprintMismatchError, never this job's result, whatever
  // `fingerprint` says. (Length-prefixed, so no name and fingerprint can run together.)
  const named = (fp: unknown): unknown => (typeof fp === 'string' ? `${name.length}:${name}:${fp}` : fp);
  const engine = createIdempotencyEngine<Args>({
    ...rest,
    // After the spread: `concurrency: undefined` (an unset setting) means this default, not core's.
    concurrency: rest.concurrency ?? 'wait',
    methods: ['CALL'],
    required: true,
    getKey: (args) => key(...args),
    ...(scope ? { scope: (args: Args) => scope(...args) } : {}),
    ...(fingerprint === false
      ? { fingerprint: () => named('') as string }
      : fingerprint
        ? { fingerprint: (args: Args) => named(fingerprint(...args)) as string }
        : {}),
    // A job's result is always stored: there is no HTTP status to judge it by.
    storable: () => true,
  });

  return async function (this: This, ...args: Args): Promise<Awaited<R>> {
    const input: IncomingRequest = { method: 'CALL', path: name, headers: {}, body: args };
    const decision = await engine.decide(input, args);
    switch (decision.kind) {
      case 'pass':
        return (await fn.apply(this, args)) as Awaited<R>;
      case 'problem':
        throw decision.error;
      case 'replay':
        // Results are stored with 200; anything else is the marker of a result that could not be
        // stored (too large, not serialisable). fn ran once: never hand the marker out as a result.
        if (decision.response.status !== 200) throw notReplayable(decision.response.body);
        return deserialize(decision.response.body) as Awaited<R>;
      case 'run': {
        let result: Awaited<R>;
        try {
          result = await fn.apply(this, args);
        } catch (error) {
          await decision.lease.abandon('handler-threw');
          throw error;
        }
        let body: Uint8Array;
        try {
          body = toBytes(serialize(result));
        } catch (error) {
          // fn ran and must not run again for this key: settle the lease with a marker, so later
          // calls reject with ResponseNotReplayableError instead of waiting or running fn twice.
          await decision.lease.commitUnbuffered(200, 'not-serializable');
          throw new TypeError(
            `[idemkit] idempotent(): fn ran, but its result could not be serialised (${error instanceof Error ? error.message : String(error)}). ` +
              'It was not stored; later calls with this key reject with ResponseNotReplayableError instead of running fn again. ' +
              'Return JSON-safe values, or pass `serialize` and `deserialize`.',
            { cause: error },
          );
        }
        await decision.lease.commit({ status: 200, headers: [], body });
        return deserialize(body) as Awaited<R>;
      }
    }
  };
}
