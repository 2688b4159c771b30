import { backoffDelay, defaultRetryOn, parseRetryAfter, pollDelay } from './retry-policy.js';

/** One attempt, as reported to `onAttempt`. */
export interface AttemptInfo {
  /** 1 for the first try. */
  readonly attempt: number;
  /** The key sent on every attempt of this operation. */
  readonly key: string;
  readonly method: string;
  readonly url: string;
  /** The response status, when there was a response. */
  readonly status?: number;
  /** The network error, when there was no response. */
  readonly error?: unknown;
  /** Whether another attempt follows, and after how long. */
  readonly willRetry: boolean;
  readonly delayMs?: number;
}

export interface IdempotentFetchOptions {
  /** The fetch to wrap. @default globalThis.fetch (looked up on each call, so a later patch of it counts) */
  fetch?: typeof globalThis.fetch | undefined;
  /** Key header: an RFC 9110 token, else createIdempotentFetch throws a TypeError. @default 'Idempotency-Key' */
  header?: string | undefined;
  /** New key per logical operation. @default crypto.randomUUID */
  generateKey?: (() => string) | undefined;
  /** Methods that get a key and retries; others are sent once, untouched. @default ['POST', 'PATCH'] */
  methods?: readonly string[] | undefined;
  /** Attempts per operation, the first included; idemkit's "still running" 409s are not counted (the deadline bounds them). @default 5 */
  maxAttempts?: number | undefined;
  /** First backoff ceiling in ms (doubles per attempt, full jitter). @default 200 */
  baseDelayMs?: number | undefined;
  /**
   * Largest wait between attempts in ms. A longer `Retry-After` is waited only this long on a 409,
   * and ends the retries on other statuses (their answer is returned). idemkit's "still running"
   * 409s are asked again after 5–10 ms at least (a 10 ms ceiling, jittered) even when this is
   * lower. @default 5_000
   */
  maxDelayMs?: number | undefined;
  /** Total time for all attempts and waits, in ms. @default 30_000 */
  deadlineMs?: number | undefined;
  /**
   * Largest request body, in bytes: it is held in memory to be sent again on a retry, so a larger
   * (or endless) one rejects the call with a TypeError before anything is sent. `Infinity` for no
   * limit. @default 16 MiB
   */
  maxBodyBytes?: number | undefined;
  /**
   * Longest wait for one attempt's response (its status and headers), in ms; past it the attempt
   * is abandoned and retried with the same key, so a connection that went silent costs one
   * attempt, not the whole deadline. Unset, an attempt may take the whole deadline.
   * @default undefined
   */
  attemptTimeoutMs?: number | undefined;
  /** Statuses that are retried. @default 408, 409, 425, 429 and 5xx (never 400 or 422) */
  retryOn?: ((status: number) => boolean) | undefined;
  /** Called after every attempt. */
  onAttempt?: ((info: AttemptInfo) => void) | undefined;
  /**
   * Source of jitter: a number from 0 to 1 (as Math.random gives; 1 makes every wait its
   * ceiling). Any other value (NaN, a negative one) rejects the call with a TypeError when a
   * wait is worked out, as does its own error. @default Math.random
   */
  random?: (() => number) | undefined;
}

/** `RequestInit` plus a caller-chosen key for this operation. */
export interface IdempotentRequestInit extends RequestInit {
  /** Use this key instead of a generated one (e.g. a key kept across page reloads). */
  idempotencyKey?: string | undefined;
}

export type IdempotentFetch = (input: string | URL | Request, init?: IdempotentRequestInit) => Promise<Response>;

/**
 * The last attempt failed without a response (a network error), and no further one is allowed
 * (`maxAttempts` reached, or the next wait would pass the deadline). `cause` is that network
 * error. Earlier attempts may have had answers (a 503), but the last one may have run the
 * operation (an answer lost on its way back), so ask again with `key`, never with a new one.
 * When no attempt reached the server, it is the subclass `RequestNotSentError`.
 */
export class RetryExhaustedError extends Error {
  override readonly name: string = 'RetryExhaustedError';
  /** The key every attempt sent. */
  readonly key: string;
  /** How many attempts were made. */
  readonly attempts: number;

  constructor(message: string, key: string, attempts: number, options?: ErrorOptions) {
    super(message, options);
    this.key = key;
    this.attempts = attempts;
  }
}

/**
 * No attempt reached the server, so the operation did not run: every attempt failed before the
 * request was sent (no connection: a DNS failure, a refused connection, a connect timeout), or the
 * server's TLS certificate was refused (self-signed, expired, another host's), which is not
 * retried since every attempt would meet it again. Sending it again, with any key, runs it once.
 * Only for a request that cannot follow a redirect (`redirect: 'error'` or `'manual'`): a followed
 * redirect's failure (a 303 after the server ran the operation) looks the same.
 * A `RetryExhaustedError` too, so code that catches that one keeps working.
 */
export class RequestNotSentError extends RetryExhaustedError {
  override readonly name: string = 'RequestNotSentError';
}

/**
 * Thrown when the total deadline ends before a response could be returned: while the request
 * body is read, during an attempt, or during a wait between attempts (earlier attempts may have
 * had answers, such as a 503).
 */
export class RetryDeadlineError extends Error {
  override readonly name = 'RetryDeadlineError';
  /** The key every attempt sent: ask again with it (`init.idempotencyKey`) to get the first one's answer, never a second run. */
  readonly key: string;

  constructor(message: string, key: string, options?: ErrorOptions) {
    super(message, options);
    this.key = key;
  }
}

const DEFAULT_METHODS = ['POST', 'PATCH'];
const DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024;
/** A field name: an RFC 9110 token. */
const HEADER_NAME = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
const MAX_TIMER_MS = 2_147_483_647;

/** Every option name, so a misspelt one can be reported. */
const OPTION_NAMES: ReadonlySet<string> = new Set<keyof IdempotentFetchOptions>([
  'fetch', 'header', 'generateKey', 'methods', 'maxAttempts', 'baseDelayMs', 'maxDelayMs', 'deadlineMs', 'maxBodyBytes', 'attemptTimeoutMs', 'retryOn', 'onAttempt', 'random',
]);

/**
 * A `fetch` that makes one logical operation out of many attempts: it sends one idempotency key
 * on every attempt and retries network errors and retryable statuses with backoff, honouring
 * `Retry-After`, so a flaky network or a double click still creates one order on the server.
 */
export function createIdempotentFetch(options: IdempotentFetchOptions = {}): IdempotentFetch {
  // A misspelt option (`maxAttempt`) would silently keep its default.
  const unknown = Object.keys(options).filter((name) => !OPTION_NAMES.has(name));
  if (unknown.length > 0) console.warn(`[idemkit] [client] Unknown option(s) ignored: ${unknown.join(', ')}.`);
  if (typeof (options.fetch ?? globalThis.fetch) !== 'function') throw new TypeError('[idemkit] [client] No fetch available: pass `fetch`.');
  // The global one is looked up per call, not kept from here: a fetch patched after the client is
  // made (msw's setupServer().listen() in a test's beforeAll, an APM agent) must see its requests.
  const baseFetch: typeof globalThis.fetch = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
  for (const name of ['generateKey', 'retryOn', 'onAttempt', 'random'] as const) {
    // null is "not given", as `??` reads it for every option.
    if (options[name] != null && typeof options[name] !== 'function') throw new TypeError(`[idemkit] [client] \`${name}\` must be a function.`);
  }
  const header = options.header ?? 'Idempotency-Key';
  // Refused here, once, rather than by Headers on every call.
  if (typeof header !== 'string' || !HEADER_NAME.test(header)) {
    throw new TypeError(`[idemkit] [client] \`header\` must be a header name (RFC 9110 token: letters, digits and !#$%&'*+-.^_\`|~); got ${describeKey(header)}.`);
  }
  const generateKey = options.generateKey ?? randomKey;
  const methods = new Set((options.methods ?? DEFAULT_METHODS).map((m) => m.toUpperCase()));
  const maxAttempts = options.maxAttempts ?? 5;
  const baseDelayMs = options.baseDelayMs ?? 200;
  const maxDelayMs = options.maxDelayMs ?? 5_000;
  const deadlineMs = options.deadlineMs ?? 30_000;
  const retryOn = options.retryOn ?? defaultRetryOn;
  const random = options.random ?? Math.random;
  // Checked where it is used (a wait before a retry), not by calling it here: a seeded source
  // would lose a value. NaN ended the retries silently (no wait passes `now + NaN < deadline`),
  // and a negative or larger value skewed every wait.
  const jitter = (): number => {
    const value: unknown = random();
    if (typeof value !== 'number' || !(value >= 0 && value <= 1)) {
      throw new TypeError(`[idemkit] [client] \`random\` must return a number from 0 to 1, as Math.random does; it returned ${describeKey(value)}.`);
    }
    return value;
  };
  if (!Number.isInteger(maxAttempts) || maxAttempts < 1) throw new TypeError('[idemkit] [client] `maxAttempts` must be a whole number, at least 1.');
  for (const [name, value] of Object.entries({ baseDelayMs, maxDelayMs, deadlineMs })) {
    if (!Number.isFinite(value) || value < 0) throw new TypeError(`[idemkit] [client] \`${name}\` must be a non-negative number.`);
    // Timers hold at most 2^31 - 1 ms; a longer deadline would fire at once.
    if (value > MAX_TIMER_MS) throw new TypeError(`[idemkit] [client] \`${name}\` must be at most ${MAX_TIMER_MS} ms.`);
  }
  const maxBodyBytes = options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
  if (typeof maxBodyBytes !== 'number' || Number.isNaN(maxBodyBytes) || maxBodyBytes < 0) {
    throw new TypeError('[idemkit] [client] `maxBodyBytes` must be a non-negative number of bytes (Infinity for no limit).');
  }
  const attemptTimeoutMs = options.attemptTimeoutMs ?? undefined;
  if (attemptTimeoutMs !== undefined && !(Number.isFinite(attemptTimeoutMs) && attemptTimeoutMs > 0 && attemptTimeoutMs <= MAX_TIMER_MS)) {
    throw new TypeError(`[idemkit] [client] \`attemptTimeoutMs\` must be a positive number of ms, at most ${MAX_TIMER_MS}.`);
  }

  return async function idempotentFetch(input, init) {
    // `?? {}`: plain fetch takes a null init too.
    const { idempotencyKey, ...requestInit } = init ?? {};
    if (init) readInheritedMembers(init, requestInit);
    // Decided before a Request is built from `input`: building one reads a Request's body, and
    // a method sent once, untouched, must get `input` as it came. Upper-cased: fetch leaves
    // 'patch' as it is written.
    // Any fetch's Request counts (undici's, a polyfill's), not only this realm's.
    const requestLike = isRequestLike(input);
    const inputMethod = requestLike ? input.method : 'GET';
    const method = (requestInit.method ?? inputMethod).toUpperCase();
    // Untouched: the caller's own init (even `{}` resets a Request's referrer on Node 24).
    if (!methods.has(method)) return baseFetch(input, init && 'idempotencyKey' in init ? requestInit : (init ?? undefined));
    if (requestLike && !(input instanceof Request)) {
      throw new TypeError('[idemkit] [client] This Request comes from another fetch implementation and cannot be copied for retries: pass its url and an init instead.');
    }
    // A browser drops every header that is not CORS-safelisted from a no-cors request, the key
    // too: each retry would be a new request to the server, a second order. Refused before the
    // body is read, as the key is.
    if ((requestInit.mode ?? (requestLike ? input.mode : undefined)) === 'no-cors') {
      throw new TypeError(
        `[idemkit] [client] A ${method} with mode 'no-cors' cannot carry the ${header} header (browsers send only CORS-safelisted headers in that mode), so its retries could run it again: use mode 'cors' or 'same-origin', or send it with plain fetch, without retries.`,
      );
    }
    // The key is settled before the Request is built: building one takes a Request's body, and a
    // refused key must leave it unread. The header is read where the Request will take it from
    // (init's headers replace a Request's own).
    // Read once into one Headers, used for the key and the Request alike: init.headers may be a
    // one-shot iterator (a Map's entries), which a second read would find empty.
    let initHeaders: Headers | undefined;
    if (requestInit.headers !== undefined) {
      const given = listed(requestInit.headers);
      // `== null`: a null idempotencyKey is no key either (`??` below reads the header then).
      if (idempotencyKey == null) refuseEmptyKeyHeader(given, header);
      initHeaders = new Headers(given);
      requestInit.headers = initHeaders;
    }
    const headerSource = initHeaders ?? (requestLike ? input.headers : undefined);
    const key = checkedKey(idempotencyKey ?? headerSource?.get(header) ?? generateKey(), header);
    // The method goes into init only when it must: a non-empty init resets a Request's referrer.
    const template = new Request(input, requestInit.method === undefined && method === inputMethod ? requestInit : { ...requestInit, method });

    const headers = new Headers(template.headers);
    headers.set(header, key);
    // The caller's signal, whether it came in `init` or on a `Request` (the template has either).
    const userSignal = template.signal;
    // A Request's own options hold on every attempt, sent as (url, init) as to any fetch: a
    // custom one (node-fetch, a polyfill, a wrapper) may know only its own Request class.
    const requestOptions = input instanceof Request ? optionsOf(template, input) : {};
    const deadlineAt = Date.now() + deadlineMs;
    // The deadline bounds reading the body and the attempts: once a response is returned, the
    // caller reads its body for as long as it needs (as with plain fetch), so the timer stops there.
    const deadline = new AbortController();
    const timer = setTimeout(() => deadline.abort(new DOMException(`No response within ${deadlineMs} ms.`, 'TimeoutError')), deadlineMs);
    const signal = AbortSignal.any([userSignal, deadline.signal]);
    try {
      // Buffer the body once so every attempt sends the same bytes (a stream can be read only once).
      let body: Blob | undefined;
      try {
        // Firefox has no Request.body (it reads undefined, not null; bugzil.la/1387483): read whole.
        const stream = template.body as ReadableStream<Uint8Array> | null | undefined;
        body = stream === null ? undefined : stream === undefined ? await readWhole(template, signal, maxBodyBytes) : await readAll(stream, signal, maxBodyBytes);
      } catch (error) {
        throw failure(error, 0);
      }
      return await attempts(body);
    } finally {
      clearTimeout(timer);
    }

    /** The caller's abort, or the deadline, as the error to reject with; else `error` itself. */
    function failure(error: unknown, attempt: number): unknown {
      if (userSignal.aborted) return userSignal.reason;
      if (deadline.signal.aborted) return new RetryDeadlineError(`[idemkit] [client] No response within ${deadlineMs} ms (${attempt} attempts).`, key, { cause: error });
      return error;
    }

    async function attempts(body: Blob | undefined): Promise<Response> {
      let lastError: unknown;
      // Attempts that count toward maxAttempts: all but idemkit's "still running" 409s, which
      // cannot run the operation again (only the deadline bounds how long those are waited out).
      let counted = 0;
      let polls = 0;
      // Whether any attempt may have reached the server (an answer, or a failure after connecting).
      // A fetch that follows redirects says nothing of the hops before the one that failed: a
      // refused connection may be that of a followed 303 (POST/redirect/GET, after the server
      // charged) or 307, to another host or to the same one gone away since (a deploy). So only
      // a request that cannot be redirected ('error', 'manual') can be known never sent.
      let sent = template.redirect === 'follow';
      for (let attempt = 1; ; attempt++) {
        const report = (info: Omit<AttemptInfo, 'attempt' | 'key' | 'method' | 'url'>): void => {
          try {
            // Typed as returning nothing, yet an async callback returns a promise that may reject.
            const result: unknown = options.onAttempt?.({ attempt, key, method: template.method, url: template.url, ...info });
            if (result instanceof Promise) result.catch(() => undefined);
          } catch {
            // A logging callback must not cost the caller a response the server already sent.
          }
        };
        let response: Response | undefined;
        // Aborted since the last attempt (the deadline, during a slow onAttempt): no new request.
        if (signal.aborted) throw failure(signal.reason, attempt - 1);
        // This attempt's own time limit (attemptTimeoutMs): it ends the wait for a response, never
        // a body the caller reads after it came (the timer is cleared first).
        const attemptLimit = attemptTimeoutMs === undefined ? undefined : new AbortController();
        const attemptTimer =
          attemptLimit && setTimeout(() => attemptLimit.abort(new DOMException(`No response to this attempt within ${attemptTimeoutMs} ms.`, 'TimeoutError')), attemptTimeoutMs);
        const attemptSignal = attemptLimit ? AbortSignal.any([signal, attemptLimit.signal]) : signal;
        try {
          // Raced with the signal: a fetch that ignores it (a wrapper) must not outlast an abort or the deadline.
          response = await untilAborted(baseFetch(template.url, { ...requestOptions, ...requestInit, method: template.method, headers, body, signal: attemptSignal }), attemptSignal);
        } catch (error) {
          if (userSignal.aborted || deadline.signal.aborted) throw failure(error, attempt);
          lastError = error;
        } finally {
          clearTimeout(attemptTimer);
        }

        const retryAfter = response ? parseRetryAfter(response.headers.get('retry-after')) : undefined;
        // A failure before the request went out (no connection, a refused certificate) cannot
        // have run the operation; any other attempt may have.
        const code = response === undefined ? networkCode(lastError) : undefined;
        const certificateRefused = code !== undefined && CERTIFICATE_REFUSED.has(code);
        if (!(certificateRefused || (code !== undefined && NOT_CONNECTED.has(code)))) sent = true;
        // fetch's own refusal (a redirect under redirect: 'error'), or a certificate it refuses:
        // every attempt would meet it again.
        const refused = response === undefined && (certificateRefused || failsAgain(lastError));
        let retryable: boolean;
        try {
          retryable = response === undefined ? !refused : retryOn(response.status) && worthRetrying(response, retryAfter, maxDelayMs);
        } catch (error) {
          // The caller's retryOn threw: its error is the call's, and nobody reads this answer.
          void discard(response);
          throw error;
        }
        let polling = false;
        if (retryable && response !== undefined && retryAfter !== undefined) {
          // Read under this attempt's time limit too: a 409 whose body stalls is no reason to wait
          // out the deadline. A controller we hold, not AbortSignal.timeout(): Node 20 holds the
          // signals given to AbortSignal.any() weakly, and a collected timeout never fires.
          const readLimit = attemptTimeoutMs === undefined ? undefined : new AbortController();
          const readTimer = readLimit && setTimeout(() => readLimit.abort(new DOMException(`No answer body within ${attemptTimeoutMs} ms.`, 'TimeoutError')), attemptTimeoutMs);
          const readSignal = readLimit ? AbortSignal.any([signal, readLimit.signal]) : signal;
          try {
            polling = await stillRunning(response, readSignal);
          } catch (error) {
            // The caller's abort or the deadline: the call ends as it would during the attempt.
            if (signal.aborted) {
              void discard(response);
              throw failure(error, attempt);
            }
          } finally {
            clearTimeout(readTimer);
          }
        }
        if (!polling) counted++;
        // The wait is worked out only when there may be a retry: no jitter for an answer returned.
        let delayMs = 0;
        try {
          if (polling) {
            // idemkit's 409 carries the lease's worst case (up to a minute) as Retry-After, while
            // the first request usually ends far sooner: ask again soon, then less and less often.
            // Retry-After counts in whole seconds: a 0 caps nothing (idemkit never sends it).
            delayMs = Math.min(Math.max(retryAfter ?? 0, 1_000), pollDelay(++polls, baseDelayMs, maxDelayMs, jitter));
          } else if (retryable && counted < maxAttempts) {
            delayMs = Math.max(backoffDelay(counted, baseDelayMs, maxDelayMs, jitter), Math.min(retryAfter ?? 0, maxDelayMs));
          }
        } catch (error) {
          // The caller's random threw or returned no number from 0 to 1: its error is the call's.
          void discard(response);
          throw error;
        }
        const willRetry = retryable && (polling || counted < maxAttempts) && Date.now() + delayMs < deadlineAt;
        report(response ? { status: response.status, willRetry, ...(willRetry ? { delayMs } : {}) } : { error: lastError, willRetry, ...(willRetry ? { delayMs } : {}) });
        // The caller left during onAttempt: an abort rejects at once, whatever came back.
        if (userSignal.aborted) {
          void discard(response);
          throw userSignal.reason;
        }

        if (!willRetry) {
          if (response) return kept(response, template, input);
          if (!sent) {
            const why = certificateRefused ? `the server's TLS certificate was refused, which every attempt would meet again: ${describe(lastError)}` : describe(lastError);
            throw new RequestNotSentError(`[idemkit] [client] The request was never sent (${attempt} attempt(s)); no attempt reached the server: ${why}`, key, attempt, { cause: lastError });
          }
          // As plain fetch rejects: no retries were used up, and none would have helped.
          if (refused && !certificateRefused) throw lastError;
          throw new RetryExhaustedError(
            `[idemkit] [client] No response to the last of ${attempt} attempt(s): ${describe(lastError)}. The operation may have run: ask again with the same key.`,
            key,
            attempt,
            { cause: lastError },
          );
        }
        // Free the connection of the answer we are discarding. Not awaited: cancelling a body
        // that was cloned (a logging or caching wrapper keeps a copy) waits for the copy to be
        // read or cancelled too, which may be never, and the retry waited out the deadline.
        void discard(response);
        // The combined signal: a deadline that passes during the wait ends it too.
        await wait(delayMs, signal).catch((error: unknown) => {
          throw failure(error, attempt);
        });
      }
    }
  };
}

/**
 * The options of a Request that `init` can carry (method, headers, body and signal are set per
 * attempt). The referrer from the caller's own Request: copying one with an init resets it
 * (always on Node 24, whose fetch counts even `{}` as an init).
 */
function optionsOf(request: Request, original: Request): RequestInit {
  return {
    cache: request.cache,
    credentials: request.credentials,
    integrity: request.integrity,
    keepalive: request.keepalive,
    // 'navigate' (a service worker's event.request) cannot be given in init.
    ...(request.mode === 'navigate' ? {} : { mode: request.mode }),
    redirect: request.redirect,
    referrer: original.referrer,
    referrerPolicy: original.referrerPolicy,
  };
}

/**
 * A random UUID v4. `crypto.randomUUID` exists only in secure contexts (HTTPS, localhost): a page
 * on plain http:// has `getRandomValues` alone.
 */
function randomKey(): string {
  const { crypto } = globalThis;
  if (typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6]! & 0x0f) | 0x40;
  bytes[8] = (bytes[8]! & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function wait(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    signal.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * A status the server may answer differently next time. Never a replay (`Idempotent-Replayed`):
 * the same key gets the same stored answer again. A 409 only with `Retry-After`, as idemkit's
 * "still running" answer always has: an application's own 409 (a conflict, "email taken") is
 * not stored, so retrying it would run the operation again and again.
 */
function worthRetrying(response: Response, retryAfter: number | undefined, maxDelayMs: number): boolean {
  if (response.headers.get('idempotent-replayed')?.trim().toLowerCase() === 'true') return false;
  if (response.status === 409) return retryAfter !== undefined;
  // A server asking for a longer pause than maxDelayMs (a rate limit, maintenance) gets its answer
  // handed back, rather than being asked again before it said it would be ready.
  return retryAfter === undefined || retryAfter <= maxDelayMs;
}

/**
 * Whether a 409 is idemkit's "a request with this key is still running" (its problem code): the
 * first request will end, and its answer is then replayed, so waiting for it runs nothing again.
 * Read from a copy, so the caller can still read the answer when it is returned.
 */
async function stillRunning(response: Response, signal: AbortSignal): Promise<boolean> {
  if (response.status !== 409 || !/^application\/problem\+json\b/i.test(response.headers.get('content-type') ?? '')) return false;
  // A web stream to copy: a Node stream (node-fetch) is left alone, as before this check existed
  // (a copy read in part and dropped errors out when its connection closes, with nobody listening).
  if (typeof response.clone !== 'function' || typeof (response.body as { getReader?: unknown } | null)?.getReader !== 'function') return false;
  const text = await firstBytes(response.clone(), PROBLEM_READ_LIMIT, signal);
  if (text === undefined) return false;
  try {
    const problem = JSON.parse(text) as { code?: unknown } | null;
    return problem?.code === 'ERR_IDEMKIT_REQUEST_IN_PROGRESS';
  } catch {
    return false;
  }
}

/** idemkit's problem bodies are a few hundred bytes: a longer 409 body is someone else's. */
const PROBLEM_READ_LIMIT = 16 * 1024;

/**
 * A copy's body as text, or `undefined` when it is longer than `limit` bytes (then the rest is
 * never read). Rejects when `signal` aborts.
 */
async function firstBytes(copy: Response, limit: number, signal: AbortSignal): Promise<string | undefined> {
  if (copy.body === null) return '';
  const reader = copy.body.getReader();
  const decoder = new TextDecoder();
  let text = '';
  let bytes = 0;
  try {
    for (;;) {
      const { done, value } = await untilAborted(reader.read(), signal);
      if (done) return text + decoder.decode();
      bytes += value.byteLength;
      if (bytes > limit) return undefined;
      text += decoder.decode(value, { stream: true });
    }
  } finally {
    // The rest of the copy is never needed (its twin, the answer, reads on undisturbed).
    reader.cancel().catch(() => undefined);
  }
}

/**
 * The whole body, read under `signal` (cancelled when it aborts), as a Blob: sent as it is on
 * every attempt. Not an ArrayBuffer: Node 20's fetch detaches one as it sends it, and then cannot
 * send it again when it follows a 307 or 308 redirect.
 */
async function readAll(stream: ReadableStream<Uint8Array>, signal: AbortSignal, limit: number): Promise<Blob> {
  const reader = stream.getReader();
  const chunks: unknown[] = [];
  let bytes = 0;
  const cancel = (): void => void reader.cancel(signal.reason).catch(() => undefined);
  signal.addEventListener('abort', cancel, { once: true });
  try {
    for (;;) {
      const { done, value } = await untilAborted(reader.read(), signal);
      if (done) break;
      // Bounded: an endless stream that yields at once would otherwise fill memory without the
      // deadline ever firing (its reads resolve without giving the timer a turn).
      bytes += chunkSize(value);
      if (bytes > limit) throw tooLarge(limit);
      chunks.push(value);
    }
  } catch (error) {
    // Aborted (perhaps before the first read, when no 'abort' event comes): the caller's stream
    // is cancelled, as fetch cancels a body it will not send.
    cancel();
    throw error;
  } finally {
    signal.removeEventListener('abort', cancel);
    reader.releaseLock();
  }
  // The Blob copies the chunks: no merged copy of our own, so a large body is held twice at most.
  return new (await fetchBlob())(chunks.map(blobPart));
}

let blobOfFetch: Promise<typeof Blob> | undefined;

/**
 * The Blob class of the fetch realm (Response's), found once. Not always the global one: vitest's
 * jsdom environment puts jsdom's Blob on the global beside Node's fetch, which sent that Blob
 * as the text "[object Blob]" instead of the body.
 */
function fetchBlob(): Promise<typeof Blob> {
  return (blobOfFetch ??=
    typeof Response === 'function'
      ? new Response('').blob().then(
          (blob) => blob.constructor as typeof Blob,
          () => Blob,
        )
      : Promise.resolve(Blob));
}

/**
 * The body of a Request that has no `body` stream (Firefox, which sends no stream bodies either,
 * so it is never endless), read whole under `signal`. Typeless, as readAll's Blob: the
 * Content-Type header says what it is. None when empty: it cannot tell an empty body from none,
 * and a GET or HEAD (in `methods`) may have no body at all.
 */
async function readWhole(request: Request, signal: AbortSignal, limit: number): Promise<Blob | undefined> {
  const blob = await untilAborted(request.blob(), signal);
  if (blob.size > limit) throw tooLarge(limit);
  return blob.size === 0 ? undefined : blob.slice();
}

function tooLarge(limit: number): TypeError {
  return new TypeError(
    `[idemkit] [client] The request body is over maxBodyBytes (${limit} bytes): it is held in memory to be sent again on a retry. Raise maxBodyBytes, or send it with plain fetch; nothing was sent.`,
  );
}

const utf8 = new TextEncoder();

/** A chunk's size in bytes, as it will be sent (a string as UTF-8); 0 for one blobPart refuses. */
function chunkSize(chunk: unknown): number {
  // A string chunk is rare (fetch sends it as UTF-8): measured by encoding it.
  if (typeof chunk === 'string') return utf8.encode(chunk).byteLength;
  if (chunk instanceof ArrayBuffer || ArrayBuffer.isView(chunk)) return chunk.byteLength;
  return 0;
}

/**
 * A chunk as a Blob part: its typings take no views of a SharedArrayBuffer, so such a chunk is
 * copied. A string is its UTF-8 text, as Node's fetch sends it (`new Uint8Array(text)` made it no
 * bytes at all); any other chunk is refused, as fetch refuses it, rather than sent as zero bytes.
 */
function blobPart(chunk: unknown): BlobPart {
  if (typeof chunk === 'string' || chunk instanceof ArrayBuffer) return chunk;
  if (!ArrayBuffer.isView(chunk)) {
    throw new TypeError(`[idemkit] [client] A request body stream may yield only Uint8Array chunks (or strings, sent as UTF-8); got ${chunk === null ? 'null' : typeof chunk}.`);
  }
  return chunk.buffer instanceof ArrayBuffer ? (chunk as ArrayBufferView<ArrayBuffer>) : new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength).slice();
}

/**
 * A rejection that every attempt would meet again: fetch refusing by its own rules (a redirect
 * under `redirect: 'error'`, too many redirects, a Location it cannot follow, a blocked port), not
 * the network. Node's fetch (undici) gives those a cause without an error `code`, made from its
 * reason ('unexpected redirect', 'redirect count exceeded'), or a TypeError (a Location that is no
 * URL); a network failure's cause carries the system's or undici's code (ECONNRESET, ECONNREFUSED,
 * UND_ERR_SOCKET), except undici's checks of the request itself, made before anything is sent (a
 * header it never sends, such as Expect or Transfer-Encoding; a Content-Length the body does not
 * have). node-fetch names the kind in `type` ('system' is the network). A browser says
 * "Failed to fetch" for both, with no cause: there, as for any other error, another attempt is made.
 */
function failsAgain(error: unknown): boolean {
  if (!(error instanceof Error)) return false;
  const { type } = error as { type?: unknown };
  if (error.name === 'FetchError' && typeof type === 'string') return type !== 'system';
  if (!(error instanceof TypeError) || !(error.cause instanceof Error)) return false;
  const { code } = error.cause as { code?: unknown };
  return error.cause instanceof TypeError || typeof code !== 'string' || REQUEST_REFUSED.has(code);
}

/**
 * The code of a network failure: on the cause of Node's fetch (undici) "fetch failed", on
 * node-fetch's system FetchError itself. Undefined for anything else (a browser's "Failed to fetch").
 */
function networkCode(error: unknown): string | undefined {
  if (!(error instanceof Error)) return undefined;
  const { code } = (error.name === 'FetchError' ? error : error instanceof TypeError ? error.cause : undefined) as { code?: unknown } | undefined ?? {};
  return typeof code === 'string' ? code : undefined;
}

/**
 * Failures before a connection existed, so before any byte of the request went out: DNS, a
 * refused connection (only a connection being opened is refused; a cut one is ECONNRESET), a
 * connect timeout. Not EHOSTUNREACH or ETIMEDOUT: a connection that dies after the request was
 * written may end with those too.
 */
const NOT_CONNECTED: ReadonlySet<string> = new Set(['ENOTFOUND', 'EAI_AGAIN', 'EAI_FAIL', 'EAI_NODATA', 'EAI_NONAME', 'ECONNREFUSED', 'UND_ERR_CONNECT_TIMEOUT']);

/**
 * The server's certificate refused during the TLS handshake, before the request is written: every
 * attempt would meet it again (OpenSSL's verify codes as Node names them, and a certificate for
 * another host name).
 */
const CERTIFICATE_REFUSED: ReadonlySet<string> = new Set([
  'ERR_TLS_CERT_ALTNAME_INVALID',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_DECRYPT_CERT_SIGNATURE',
  'UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY',
  'CERT_SIGNATURE_FAILURE',
  'CERT_NOT_YET_VALID',
  'CERT_HAS_EXPIRED',
  'ERROR_IN_CERT_NOT_BEFORE_FIELD',
  'ERROR_IN_CERT_NOT_AFTER_FIELD',
  'CERT_CHAIN_TOO_LONG',
  'CERT_REVOKED',
  'INVALID_CA',
  'PATH_LENGTH_EXCEEDED',
  'INVALID_PURPOSE',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'HOSTNAME_MISMATCH',
]);

/** undici's codes for a request it refuses to send: every attempt would meet them again. */
const REQUEST_REFUSED: ReadonlySet<string> = new Set(['UND_ERR_INVALID_ARG', 'UND_ERR_NOT_SUPPORTED', 'UND_ERR_REQ_CONTENT_LENGTH_MISMATCH']);

/** An error's message, with its cause's code or message (fetch's "fetch failed" says nothing of ECONNREFUSED). */
function describe(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  const cause = error.cause as { code?: unknown; message?: unknown } | undefined;
  const why = typeof cause?.code === 'string' ? cause.code : typeof cause?.message === 'string' ? cause.message : undefined;
  return why === undefined ? error.message : `${error.message} (${why})`;
}

/**
 * Free the connection of an answer nobody will read: a web stream body is cancelled, a Node
 * stream's (node-fetch's) destroyed. Never throws.
 */
async function discard(response: unknown): Promise<void> {
  const body = (response as { body?: { cancel?: unknown; destroy?: unknown } | null } | undefined)?.body;
  try {
    if (typeof body?.cancel === 'function') await (body.cancel as () => Promise<void>).call(body);
    else if (typeof body?.destroy === 'function') (body.destroy as () => void).call(body);
  } catch {
    // Already read, locked or errored: nothing left to free.
  }
}

/**
 * The Requests a returned response's abort still travels through, by the response and its body
 * (a caller may hold either while it reads). The caller's signal reaches the fetch's through the
 * Request built from it (and a Request input's own signal), and Node links those signals weakly:
 * once the Request was collected, an abort no longer stopped reading the body.
 */
const abortPaths = new WeakMap<object, readonly [Request, unknown]>();

function kept(response: Response, template: Request, input: unknown): Response {
  const path = [template, input] as const;
  abortPaths.set(response, path);
  if (response.body !== null) abortPaths.set(response.body, path);
  return response;
}

/** `work`, or a rejection with the signal's reason as soon as it aborts. */
function untilAborted<T>(work: T | Promise<T>, signal: AbortSignal): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason as Error);
    if (signal.aborted) onAbort();
    else signal.addEventListener('abort', onAbort, { once: true });
    // Promise.resolve: a custom fetch may hand back a Response itself, not a promise of one.
    Promise.resolve(work).then(
      (value) => {
        signal.removeEventListener('abort', onAbort);
        // Too late (a fetch that ignored the signal): free the connection of an answer nobody reads.
        if (signal.aborted) void discard(value);
        resolve(value);
      },
      (error: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(error as Error);
      },
    );
  });
}

/** What the draft and idemkit's server take as a key: 1–255 printable ASCII characters. */
const KEY = /^[\x20-\x7e]{1,255}$/;

/**
 * The key, refused before anything is sent (and before a Request's body is read) when a server
 * following the draft would answer 400, which is not retried. A key that starts with `"` is the
 * draft's structured-field form: what its quotes hold is checked by the same rules.
 */
function checkedKey(given: unknown, header: string): string {
  const from = `(from \`idempotencyKey\`, the ${header} header or \`generateKey\`)`;
  if (typeof given !== 'string' || given.trim() === '') {
    throw new TypeError(`[idemkit] [client] The idempotency key must be a non-empty string ${from}; got ${describeKey(given)}.`);
  }
  const problem = given.startsWith('"') ? quotedKeyProblem(given) : bareKeyProblem(given);
  if (problem === undefined) return given;
  throw new TypeError(`[idemkit] [client] The idempotency key ${from} ${problem}; got ${describeKey(given.length > 60 ? `${given.slice(0, 60)}…` : given)}.`);
}

/** Why a server would refuse `key` (the content of a quoted key too), or undefined. */
function keyProblem(key: string): string | undefined {
  if (KEY.test(key)) return undefined;
  if (key.length === 0) return 'is empty';
  return key.length > 255 ? `is ${key.length} characters long; at most 255 are allowed` : 'may hold printable ASCII characters only (no control or non-ASCII characters)';
}

function bareKeyProblem(key: string): string | undefined {
  return (
    keyProblem(key) ??
    (key.trim() !== key
      ? 'starts or ends with a space, which the header would lose (the server would see another key)'
      : key.includes(',')
        ? 'holds a comma, which servers take for two joined headers (send it quoted, as a structured-field string: `"a,b"`)'
        : undefined)
  );
}

/** The members of RequestInit fetch reads, undici's `dispatcher` included. */
const REQUEST_INIT_MEMBERS = [
  'method', 'headers', 'body', 'redirect', 'referrer', 'referrerPolicy', 'mode', 'credentials',
  'cache', 'integrity', 'keepalive', 'signal', 'window', 'duplex', 'priority', 'dispatcher',
] as const;

/**
 * fetch reads each init member by property access (WebIDL), so a member a getter holds counts:
 * a Request passed as the init (`fetch(url, request)`), a class instance. A spread sees own
 * properties only: such a POST was taken for a GET and went out once, with no key.
 */
function readInheritedMembers(init: RequestInit, into: Record<string, unknown>): void {
  for (const name of REQUEST_INIT_MEMBERS) {
    if (Object.hasOwn(into, name)) continue;
    const value: unknown = Reflect.get(init, name);
    if (value !== undefined) into[name] = value;
  }
}

/**
 * RFC 9651 parameters (`;key=bare-item`, each `;` may be followed by spaces): what a server's
 * structured-field parser takes after the closing quote. Anything else there is its 400.
 */
/** A display string's characters: printable ASCII but `"` and `%`, or a lower-case %xx escape. */
const SF_DISPLAY_CHARS = '(?:[\\x20\\x21\\x23\\x24\\x26-\\x7e]|%[0-9a-f]{2})*';
const SF_BARE_ITEM = [
  '-?\\d{1,12}\\.\\d{1,3}', // decimal
  '-?\\d{1,15}', // integer
  '"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e]|\\\\["\\\\])*"', // string
  "[A-Za-z*][!#$%&'*+\\-.^_`|~0-9A-Za-z:/]*", // token
  // Base64 in groups of four, the last one short or padded: `:a:` or `:abcde:` is no byte sequence.
  ':(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}(?:==)?|[A-Za-z0-9+/]{3}=?)?:', // byte sequence
  '\\?[01]', // boolean
  `%"${SF_DISPLAY_CHARS}"`, // display string (its UTF-8 checked below)
].join('|');
const SF_NAME = '; *[a-z*][a-z0-9_\\-.*]*';
// A date (`@` and an integer) only as the last parameter: the server's parser (structured-headers
// 2) refuses anything after one.
const SF_PARAMETERS = new RegExp(`^(?:${SF_NAME}(?:=(?:${SF_BARE_ITEM}))?)*(?:${SF_NAME}=@-?\\d{1,15})?$`);
/** A display string's percent-encoded bytes must be UTF-8, or the server's parser refuses it. */
const SF_DISPLAY_STRING = new RegExp(`%"(${SF_DISPLAY_CHARS})"`, 'g');

function parametersProblem(rest: string): boolean {
  if (!SF_PARAMETERS.test(rest)) return true;
  for (const [, encoded] of rest.matchAll(SF_DISPLAY_STRING)) {
    try {
      decodeURIComponent(encoded ?? '');
    } catch {
      return true;
    }
  }
  return false;
}

/**
 * Why a server would refuse a key in the structured-field form (RFC 9651 sf-string), or undefined.
 * Written out rather than core's parseKeyHeader: the client has no runtime dependencies. The
 * parameters a server ignores (`"k";a=1`) are left to it; they only need to be sendable.
 */
function quotedKeyProblem(value: string): string | undefined {
  let content = '';
  let end = -1;
  for (let i = 1; i < value.length; i++) {
    const char = value[i]!;
    if (char === '"') {
      end = i + 1;
      break;
    }
    if (char === '\\') {
      const next = value[++i];
      if (next !== '"' && next !== '\\') return 'starts with `"` but is no structured-field string: a backslash may only escape `"` or `\\`';
      content += next;
    } else content += char;
  }
  if (end === -1) return 'starts with `"` but is no structured-field string: the closing `"` is missing';
  // Spaces and tabs after it are dropped by Headers, and by the server's parser.
  let stop = value.length;
  while (stop > end && (value[stop - 1] === ' ' || value[stop - 1] === '\t')) stop--;
  const rest = value.slice(end, stop);
  if (rest !== '' && parametersProblem(rest)) {
    return 'starts with `"` but is no structured-field string: only parameters (`;name=value`, RFC 9651: a lower-case name, a number, token, string, byte sequence, boolean, date or display string) may follow the closing `"`';
  }
  const problem = keyProblem(content);
  return problem === undefined ? undefined : `${problem} between its quotes`;
}

/**
 * A key header given as `undefined` or `null` in a plain object or a list (plain JavaScript: a
 * variable not set yet). `Headers` would send it as the text "undefined", one key shared by
 * every such call, so the second customer would get the first one's stored answer.
 */
function refuseEmptyKeyHeader(headers: HeadersInit, header: string): void {
  if (headers instanceof Headers) return;
  const name = header.toLowerCase();
  const entries: Iterable<readonly unknown[]> = Array.isArray(headers) ? (headers as unknown[][]) : Object.entries(headers);
  for (const [key, value] of entries) {
    if (typeof key === 'string' && key.toLowerCase() === name && (value === undefined || value === null)) {
      throw new TypeError(`[idemkit] [client] The ${header} header in init.headers is ${String(value)}: pass the key itself, or leave the header out for a new key per call.`);
    }
  }
}

/**
 * `init.headers` that can be read more than once: an iterable that is no array or Headers (a
 * Map's entries, a generator, another fetch's Headers) copied into an array of pairs, as Headers
 * reads it. Anything else as it came, for Headers to take or refuse with its own error.
 */
function listed(headers: HeadersInit): HeadersInit {
  if (headers instanceof Headers || Array.isArray(headers) || !isIterable(headers)) return headers;
  // A pair may itself be a one-shot iterable: copied too, so the key check does not use it up.
  return Array.from(headers, (pair: unknown) => (Array.isArray(pair) || !isIterable(pair) ? pair : Array.from(pair))) as HeadersInit;
}

function isIterable(value: unknown): value is Iterable<unknown> {
  return typeof value === 'object' && value !== null && typeof (value as { [Symbol.iterator]?: unknown })[Symbol.iterator] === 'function';
}

function describeKey(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value);
  if (typeof (value as { then?: unknown } | null | undefined)?.then === 'function') return 'a promise (`generateKey` must return the key itself)';
  if (typeof value === 'bigint') return `${value}n`;
  if (typeof value === 'object' && value !== null) return 'an object';
  return String(value);
}

/** A Request of this realm or of another fetch implementation (undici's own, a polyfill's); not a URL-like object. */
function isRequestLike(input: string | URL | Request): input is Request {
  return typeof input === 'object' && !(input instanceof URL) && typeof input.url === 'string' && typeof input.method === 'string';
}
