import { backoffDelay, defaultRetryOn, parseRetryAfter } from './retry-policy.js';

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
  /** The fetch to wrap. @default globalThis.fetch */
  fetch?: typeof globalThis.fetch;
  /** Key header. @default 'Idempotency-Key' */
  header?: string;
  /** New key per logical operation. @default crypto.randomUUID */
  generateKey?: () => string;
  /** Methods that get a key and retries; others are sent once, untouched. @default ['POST', 'PATCH'] */
  methods?: readonly string[];
  /** Attempts per operation, the first included. @default 5 */
  maxAttempts?: number;
  /** First backoff ceiling in ms (doubles per attempt, full jitter). @default 200 */
  baseDelayMs?: number;
  /** Largest wait between attempts in ms, also the cap on a server's `Retry-After`. @default 5_000 */
  maxDelayMs?: number;
  /** Total time for all attempts and waits, in ms. @default 30_000 */
  deadlineMs?: number;
  /** Statuses that are retried. @default 408, 409, 425, 429 and 5xx (never 400 or 422) */
  retryOn?: (status: number) => boolean;
  /** Called after every attempt. */
  onAttempt?: (info: AttemptInfo) => void;
  /** Source of jitter in [0, 1). @default Math.random */
  random?: () => number;
}

/** `RequestInit` plus a caller-chosen key for this operation. */
export interface IdempotentRequestInit extends RequestInit {
  /** Use this key instead of a generated one (e.g. a key kept across page reloads). */
  idempotencyKey?: string;
}

export type IdempotentFetch = (input: string | URL | Request, init?: IdempotentRequestInit) => Promise<Response>;

/** Thrown when the total deadline ends before any attempt produced a response. */
export class RetryDeadlineError extends Error {
  override readonly name = 'RetryDeadlineError';
}

const DEFAULT_METHODS = ['POST', 'PATCH'];
const MAX_TIMER_MS = 2_147_483_647;

/**
 * A `fetch` that makes one logical operation out of many attempts: it sends one idempotency key
 * on every attempt and retries network errors and retryable statuses with backoff, honouring
 * `Retry-After`, so a flaky network or a double click still creates one order on the server.
 */
export function createIdempotentFetch(options: IdempotentFetchOptions = {}): IdempotentFetch {
  const baseFetch = options.fetch ?? globalThis.fetch;
  if (typeof baseFetch !== 'function') throw new TypeError('[idemkit] [client] No fetch available: pass `fetch`.');
  const header = options.header ?? 'Idempotency-Key';
  const generateKey = options.generateKey ?? (() => globalThis.crypto.randomUUID());
  const methods = new Set((options.methods ?? DEFAULT_METHODS).map((m) => m.toUpperCase()));
  const maxAttempts = options.maxAttempts ?? 5;
  const baseDelayMs = options.baseDelayMs ?? 200;
  const maxDelayMs = options.maxDelayMs ?? 5_000;
  const deadlineMs = options.deadlineMs ?? 30_000;
  const retryOn = options.retryOn ?? defaultRetryOn;
  const random = options.random ?? Math.random;
  for (const [name, value] of Object.entries({ maxAttempts, baseDelayMs, maxDelayMs, deadlineMs })) {
    if (!Number.isFinite(value) || value < (name === 'maxAttempts' ? 1 : 0)) throw new TypeError(`[idemkit] [client] \`${name}\` must be a non-negative number.`);
    // Timers hold at most 2^31 - 1 ms; a longer deadline would fire at once.
    if (name !== 'maxAttempts' && value > MAX_TIMER_MS) throw new TypeError(`[idemkit] [client] \`${name}\` must be at most ${MAX_TIMER_MS} ms.`);
  }

  return async function idempotentFetch(input, init = {}) {
    const { idempotencyKey, ...requestInit } = init;
    const template = new Request(input, requestInit);
    if (!methods.has(template.method)) return baseFetch(input, requestInit);

    const headers = new Headers(template.headers);
    const key = idempotencyKey ?? headers.get(header) ?? generateKey();
    headers.set(header, key);
    // Buffer the body once so every attempt sends the same bytes (a stream can be read only once).
    const body = template.body === null ? undefined : await template.arrayBuffer();
    // The caller's signal, whether it came in `init` or on a `Request` (the template has either).
    const userSignal = template.signal;
    // A Request's own options hold on every attempt, sent as (url, init) as to any fetch: a
    // custom one (node-fetch, a polyfill, a wrapper) may know only its own Request class.
    const requestOptions = input instanceof Request ? optionsOf(template) : {};
    const deadlineAt = Date.now() + deadlineMs;
    // The deadline bounds the attempts only: once a response is returned, the caller reads its
    // body for as long as it needs (as with plain fetch), so the timer stops there.
    const deadline = new AbortController();
    const timer = setTimeout(() => deadline.abort(new DOMException(`No response within ${deadlineMs} ms.`, 'TimeoutError')), deadlineMs);
    const signal = AbortSignal.any([userSignal, deadline.signal]);
    try {
      return await attempts();
    } finally {
      clearTimeout(timer);
    }

    async function attempts(): Promise<Response> {
      let lastError: unknown;
      for (let attempt = 1; ; attempt++) {
        const report = (info: Omit<AttemptInfo, 'attempt' | 'key' | 'method' | 'url'>) =>
          options.onAttempt?.({ attempt, key, method: template.method, url: template.url, ...info });
        let response: Response | undefined;
        try {
          response = await baseFetch(template.url, { ...requestOptions, ...requestInit, method: template.method, headers, body, signal });
        } catch (error) {
          if (userSignal.aborted) throw userSignal.reason;
          if (deadline.signal.aborted) throw new RetryDeadlineError(`[idemkit] [client] No response within ${deadlineMs} ms (${attempt} attempts).`, { cause: error });
          lastError = error;
        }

        const retryable = response === undefined || retryOn(response.status);
        const retryAfter = response ? parseRetryAfter(response.headers.get('retry-after')) : undefined;
        // Retry-After is honoured up to maxDelayMs: idemkit's 409 carries the lease's worst case
        // (up to a minute) while the first request usually ends far sooner, and a replay is cheap.
        const delayMs = Math.max(backoffDelay(attempt, baseDelayMs, maxDelayMs, random), Math.min(retryAfter ?? 0, maxDelayMs));
        const willRetry = retryable && attempt < maxAttempts && Date.now() + delayMs < deadlineAt;
        report(response ? { status: response.status, willRetry, ...(willRetry ? { delayMs } : {}) } : { error: lastError, willRetry, ...(willRetry ? { delayMs } : {}) });

        if (!willRetry) {
          if (response) return response;
          throw lastError;
        }
        // Free the connection of the answer we are discarding.
        await response?.body?.cancel().catch(() => undefined);
        await wait(delayMs, userSignal);
      }
    }
  };
}

/** The options of a Request that `init` can carry (method, headers, body and signal are set per attempt). */
function optionsOf(request: Request): RequestInit {
  return {
    cache: request.cache,
    credentials: request.credentials,
    integrity: request.integrity,
    keepalive: request.keepalive,
    // 'navigate' (a service worker's event.request) cannot be given in init.
    ...(request.mode === 'navigate' ? {} : { mode: request.mode }),
    redirect: request.redirect,
    referrer: request.referrer,
    referrerPolicy: request.referrerPolicy,
  };
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
