import { spawnSync } from 'node:child_process';
import { Agent as HttpsAgent } from 'node:https';
import { fileURLToPath } from 'node:url';
import { parseKeyHeader } from '@idemkit/core';
import nodeFetch from 'node-fetch';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { backoffDelay, createIdempotentFetch, parseRetryAfter, RequestNotSentError, RetryDeadlineError, RetryExhaustedError, type AttemptInfo } from '../src/index.js';
import { makeCertificates, startLossyProxy, startServer, startTlsServer, type TestCertificates, type TestServer } from './server.js';

const open: Array<{ close(): Promise<void> }> = [];
afterEach(async () => {
  await Promise.all(open.splice(0).map((s) => s.close()));
});

async function server(options?: Parameters<typeof startServer>[0]): Promise<TestServer> {
  const s = await startServer(options);
  open.push(s);
  return s;
}

function recorder() {
  const attempts: AttemptInfo[] = [];
  return { attempts, onAttempt: (a: AttemptInfo) => attempts.push(a) };
}

const fast = { baseDelayMs: 5, maxDelayMs: 50 };

/** Runs `work`, then fails if any promise rejection went unhandled meanwhile (a crash under Node's defaults). */
async function noUnhandledRejection(work: () => Promise<void>): Promise<void> {
  const escaped: unknown[] = [];
  const onRejection = (reason: unknown): void => void escaped.push(reason);
  process.on('unhandledRejection', onRejection);
  try {
    await work();
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(escaped).toEqual([]);
  } finally {
    process.off('unhandledRejection', onRejection);
  }
}

/** A client whose user leaves the page (aborts) as soon as it decides to retry; its waits are long. */
function abortedOnFirstRetry(controller: AbortController) {
  return createIdempotentFetch({
    baseDelayMs: 10_000,
    maxDelayMs: 10_000,
    random: () => 1,
    onAttempt: (a) => {
      if (a.willRetry) controller.abort(new Error('user left the page'));
    },
  });
}
const json = (body: unknown): RequestInit => ({ method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });

describe('createIdempotentFetch against a real @idemkit/fastify server', () => {
  it('lost responses: retries with the same key, the handler runs once, the retry gets the replay', async () => {
    const s = await server();
    const proxy = await startLossyProxy(s.url, 2);
    open.push(proxy);
    const { attempts, onAttempt } = recorder();
    const fetchSafe = createIdempotentFetch({ ...fast, onAttempt });
    const res = await fetchSafe(`${proxy.url}/orders`, json({ item: 'book' }));
    expect(res.status).toBe(201);
    expect(res.headers.get('idempotent-replayed')).toBe('true');
    expect(await res.json()).toEqual({ order: 1, body: { item: 'book' } });
    expect(s.runs.get('orders')).toBe(1);
    expect(attempts.map((a) => a.status ?? 'network-error')).toEqual(['network-error', 'network-error', 201]);
    expect(new Set(attempts.map((a) => a.key)).size).toBe(1);
  });

  // Was: the init was read with a spread, which sees own properties only. A Request passed as the
  // init (`fetch(url, request)`, common in proxies) or a class with getters was taken for a GET:
  // its POST went out once, without a key, and a lost answer was never retried.
  it('a POST whose init is a Request or holds its members in getters gets a key and is retried with it', async () => {
    class CheckoutInit {
      get method(): string {
        return 'POST';
      }
      get headers(): Record<string, string> {
        return { 'content-type': 'application/json' };
      }
      get body(): string {
        return JSON.stringify({ item: 'pen' });
      }
    }
    const s = await server();
    const proxy = await startLossyProxy(s.url, (n) => n % 2 === 1); // every first attempt's answer is lost
    open.push(proxy);
    const inits: Array<[string, () => RequestInit]> = [
      ['a Request', () => new Request('http://unused.invalid/', json({ item: 'pen' }))],
      ['a class instance', () => new CheckoutInit()],
    ];
    for (const [label, init] of inits) {
      const { attempts, onAttempt } = recorder();
      const res = await createIdempotentFetch({ ...fast, onAttempt })(`${proxy.url}/orders`, init());
      expect(res.status, label).toBe(201);
      expect(res.headers.get('idempotent-replayed'), label).toBe('true');
      expect(attempts.map((a) => a.status ?? 'network-error'), label).toEqual(['network-error', 201]);
      expect(new Set(attempts.map((a) => a.key)).size, label).toBe(1);
    }
    expect(s.runs.get('orders')).toBe(2);
  });

  it('409 while the first still runs: retries until the replay arrives (a double click makes one order)', async () => {
    const s = await server();
    const key = 'double-click-1';
    const first = createIdempotentFetch(fast)(`${s.url}/orders?hold=1`, { ...json({ item: 'x' }), idempotencyKey: key });
    await vi.waitFor(() => expect(s.runs.get('orders')).toBe(1), { interval: 5, timeout: 10_000 });
    // The second click meets the first while its handler still runs (held until we open it).
    const { attempts, onAttempt } = recorder();
    const second = createIdempotentFetch({ ...fast, maxAttempts: 50, onAttempt })(`${s.url}/orders?hold=1`, {
      ...json({ item: 'x' }),
      idempotencyKey: key,
    });
    await vi.waitFor(() => expect(attempts.some((a) => a.status === 409 && a.willRetry)).toBe(true), { interval: 5, timeout: 10_000 });
    s.open();
    const [a, b] = await Promise.all([first, second]);
    expect([a.status, b.status]).toEqual([201, 201]);
    expect(b.headers.get('idempotent-replayed')).toBe('true');
    expect(await a.json()).toEqual(await b.json());
    expect(s.runs.get('orders')).toBe(1);
    expect(attempts.at(-1)?.status).toBe(201);
    expect(new Set(attempts.map((x) => x.key))).toEqual(new Set([key]));
  });

  // Was: every 409 waited min(Retry-After, maxDelayMs) = 5 s, counted toward maxAttempts, and a
  // wait that did not fit the deadline returned the 409 at once.
  it("idemkit's 409 is asked again soon, then less often, and does not use up maxAttempts", async () => {
    const s = await server();
    const key = 'double-click-2';
    const first = createIdempotentFetch(fast)(`${s.url}/orders?hold=1`, { ...json({ item: 'y' }), idempotencyKey: key });
    await vi.waitFor(() => expect(s.runs.get('orders')).toBe(1), { interval: 5, timeout: 10_000 });
    const { attempts, onAttempt } = recorder();
    const second = createIdempotentFetch({ baseDelayMs: 20, maxDelayMs: 5_000, maxAttempts: 2, random: () => 1, onAttempt })(`${s.url}/orders?hold=1`, {
      ...json({ item: 'y' }),
      idempotencyKey: key,
    });
    await vi.waitFor(() => expect(attempts.filter((a) => a.status === 409 && a.willRetry).length).toBeGreaterThanOrEqual(4), { interval: 5, timeout: 10_000 });
    s.open();
    const [a, b] = await Promise.all([first, second]);
    expect(b.status).toBe(201);
    expect(b.headers.get('idempotent-replayed')).toBe('true');
    expect(await b.json()).toEqual(await a.json());
    expect(s.runs.get('orders')).toBe(1);
    // The server's Retry-After is the lease's worst case (about a minute): the waits double from baseDelayMs instead.
    expect(attempts.slice(0, 4).map((x) => [x.status, x.delayMs])).toEqual([[409, 20], [409, 40], [409, 80], [409, 160]]);
    expect(attempts.length).toBeGreaterThan(2);
  });

  it("with baseDelayMs: 0 idemkit's 409 is still asked again from 10 ms up, not back to back", async () => {
    const s = await server();
    const key = 'double-click-3';
    const first = createIdempotentFetch(fast)(`${s.url}/orders?hold=1`, { ...json({ item: 'z' }), idempotencyKey: key });
    await vi.waitFor(() => expect(s.runs.get('orders')).toBe(1), { interval: 5, timeout: 10_000 });
    const { attempts, onAttempt } = recorder();
    const second = createIdempotentFetch({ baseDelayMs: 0, random: () => 1, onAttempt })(`${s.url}/orders?hold=1`, { ...json({ item: 'z' }), idempotencyKey: key });
    await vi.waitFor(() => expect(attempts.length).toBeGreaterThanOrEqual(4), { interval: 5, timeout: 10_000 });
    s.open();
    expect((await second).status).toBe(201);
    await first;
    expect(attempts.slice(0, 4).map((x) => x.delayMs)).toEqual([10, 20, 40, 80]);
  });

  // Was: the 10 ms floor came before the maxDelayMs cap, so maxDelayMs: 0 polled back to back
  // (thousands of requests a second against a running handler, until the deadline).
  it("with maxDelayMs: 0 idemkit's 409 is still asked again at most every 10 ms, not back to back", async () => {
    const s = await server();
    const key = 'double-click-4';
    const first = createIdempotentFetch(fast)(`${s.url}/orders?hold=1`, { ...json({ item: 'w' }), idempotencyKey: key });
    await vi.waitFor(() => expect(s.runs.get('orders')).toBe(1), { interval: 5, timeout: 10_000 });
    const { attempts, onAttempt } = recorder();
    const second = createIdempotentFetch({ maxDelayMs: 0, random: () => 1, onAttempt })(`${s.url}/orders?hold=1`, { ...json({ item: 'w' }), idempotencyKey: key });
    await vi.waitFor(() => expect(attempts.length).toBeGreaterThanOrEqual(4), { interval: 5, timeout: 10_000 });
    const requests = s.requests;
    await new Promise((resolve) => setTimeout(resolve, 300));
    // 10 ms apart at least: at most 31 polls in 300 ms, however fast the server answers.
    expect(s.requests - requests).toBeLessThanOrEqual(31);
    s.open();
    expect((await second).status).toBe(201);
    await first;
    expect(attempts.slice(0, 4).map((x) => x.delayMs)).toEqual([10, 10, 10, 10]);
  });

  it('a 409 problem body that stalls ends the call at the deadline with RetryDeadlineError, not with an unreadable answer', async () => {
    const { createServer } = await import('node:http');
    const stalled = createServer((_req, res) => {
      res.writeHead(409, { 'content-type': 'application/problem+json', 'retry-after': '30' });
      res.write('{"code":"ERR_IDEMKIT_REQ'); // and nothing more
    });
    await new Promise<void>((resolve) => stalled.listen(0, '127.0.0.1', resolve));
    open.push({ close: () => new Promise<void>((resolve) => { stalled.closeAllConnections(); stalled.close(() => resolve()); }) });
    const { port } = stalled.address() as { port: number };
    const failed = await createIdempotentFetch({ deadlineMs: 300 })(`http://127.0.0.1:${port}/orders`, json({})).catch((error: unknown) => error);
    expect(failed).toBeInstanceOf(RetryDeadlineError);

    // Under attemptTimeoutMs the read of each copy ends with the attempt's limit: such a 409 is
    // no idemkit answer to wait on, so it counts, and the last one is returned before the deadline.
    const { attempts, onAttempt } = recorder();
    // 750 ms: the 409's head must arrive within it (on two busy cores 200 ms was once too short).
    const res = await createIdempotentFetch({ ...fast, attemptTimeoutMs: 750, maxAttempts: 2, deadlineMs: 20_000, onAttempt })(`http://127.0.0.1:${port}/orders`, json({}));
    expect(res.status).toBe(409);
    expect(attempts.map((x) => [x.status, x.willRetry])).toEqual([[409, true], [409, false]]);
    await res.body?.cancel();
  });

  it("an application's own 409 with Retry-After counts toward maxAttempts (retrying it runs the handler again)", async () => {
    const s = await server();
    const { attempts, onAttempt } = recorder();
    const res = await createIdempotentFetch({ ...fast, maxAttempts: 3, onAttempt })(`${s.url}/statuses`, {
      method: 'POST',
      headers: { 'x-statuses': '409,409,409,409', 'x-retry-after': '0' },
    });
    expect(res.status).toBe(409);
    expect(attempts.map((a) => a.status)).toEqual([409, 409, 409]);
    expect(s.runs.get('statuses')).toBe(3);
  });

  it('a Retry-After longer than maxDelayMs is not cut short: that answer is returned, not asked again early', async () => {
    const s = await server();
    const { attempts, onAttempt } = recorder();
    const res = await createIdempotentFetch({ ...fast, onAttempt })(`${s.url}/statuses`, { method: 'POST', headers: { 'x-statuses': '429', 'x-retry-after': '60' } });
    expect(res.status).toBe(429);
    expect(res.headers.get('retry-after')).toBe('60');
    expect(attempts.map((a) => [a.status, a.willRetry])).toEqual([[429, false]]);
    expect(s.runs.get('statuses')).toBe(1);
  });

  it.each([408, 425, 429, 500, 503])('retries %i and sends the same key every time', async (status) => {
    const s = await server();
    const { attempts, onAttempt } = recorder();
    const res = await createIdempotentFetch({ ...fast, onAttempt })(`${s.url}/statuses`, { method: 'POST', headers: { 'x-statuses': `${status},${status}` } });
    expect(res.status).toBe(201);
    expect(attempts.map((a) => a.status)).toEqual([status, status, 201]);
    expect(new Set(attempts.map((a) => a.key)).size).toBe(1);
  });

  it('honours Retry-After (up to maxDelayMs)', async () => {
    const s = await server();
    const { attempts, onAttempt } = recorder();
    const res = await createIdempotentFetch({ baseDelayMs: 1, maxDelayMs: 5_000, onAttempt })(`${s.url}/statuses`, {
      method: 'POST',
      headers: { 'x-statuses': '503', 'x-retry-after': '1' },
    });
    expect(res.status).toBe(201);
    expect(attempts[0]?.delayMs).toBeGreaterThanOrEqual(1_000);
  });

  it.each([
    // A key only the server's own rules refuse (its validateKey): the client cannot know them.
    ['400 (invalid key)', { idempotencyKey: 'not-a-uuid' }, 400],
    ['422 (key reused with another body)', { idempotencyKey: 'reused' }, 422],
  ])('never retries %s', async (_, init, status) => {
    const s = await server({ validateKey: (key) => key !== 'not-a-uuid' || 'keys are UUIDs' });
    const { attempts, onAttempt } = recorder();
    const fetchSafe = createIdempotentFetch({ ...fast, onAttempt });
    if (status === 422) await fetchSafe(`${s.url}/orders`, { ...json({ a: 1 }), ...init });
    attempts.length = 0;
    const res = await fetchSafe(`${s.url}/orders`, { ...json({ a: 2 }), ...init });
    expect(res.status).toBe(status);
    expect(res.headers.get('content-type')).toContain('application/problem+json');
    expect(attempts).toHaveLength(1);
  });

  it('stops after maxAttempts and returns the last response', async () => {
    const s = await server();
    const { attempts, onAttempt } = recorder();
    const res = await createIdempotentFetch({ ...fast, maxAttempts: 3, onAttempt })(`${s.url}/statuses`, { method: 'POST', headers: { 'x-statuses': '503,503,503,503' } });
    expect(res.status).toBe(503);
    expect(attempts).toHaveLength(3);
    expect(attempts.at(-1)?.willRetry).toBe(false);
  });

  it('an AbortSignal stops the retries', async () => {
    const s = await server();
    const controller = new AbortController();
    const fetchSafe = abortedOnFirstRetry(controller);
    await expect(fetchSafe(`${s.url}/statuses`, { method: 'POST', headers: { 'x-statuses': '503' }, signal: controller.signal })).rejects.toThrow('user left the page');
    expect(s.runs.get('statuses')).toBe(1);
  });

  it('a Request keeps its own signal and options on every attempt', async () => {
    const s = await server();
    const controller = new AbortController();
    const fetchSafe = abortedOnFirstRetry(controller);
    const aborted = new Request(`${s.url}/statuses`, { method: 'POST', headers: { 'x-statuses': '503' }, signal: controller.signal });
    await expect(fetchSafe(aborted)).rejects.toThrow('user left the page');
    expect(s.runs.get('statuses')).toBe(1);
    // redirect: 'manual' on the Request: the 303 comes back instead of being followed.
    const res = await fetchSafe(new Request(`${s.url}/moved`, { method: 'POST', body: '{}', redirect: 'manual' }));
    expect(res.status).toBe(303);
    expect(s.runs.get('list')).toBeUndefined();
  });

  it('a custom fetch still gets (url, init), with a Request\'s options in init', async () => {
    // node-fetch and polyfills know only their own Request class: they must get a URL string.
    const s = await server();
    const seen: Array<{ input: unknown; init: RequestInit | undefined }> = [];
    const fetchSafe = createIdempotentFetch({
      fetch: (input, init) => {
        seen.push({ input, init });
        return fetch(input, init);
      },
    });
    const res = await fetchSafe(new Request(`${s.url}/moved`, { method: 'POST', body: '{}', redirect: 'manual' }));
    expect(res.status).toBe(303);
    expect(typeof seen[0]?.input).toBe('string');
    expect(seen[0]?.init).toMatchObject({ method: 'POST', redirect: 'manual' });
    expect(new Headers(seen[0]?.init?.headers).get('idempotency-key')).toBeTruthy();
  });

  it('the deadline bounds the attempts, not the reading of the body it returned', async () => {
    const s = await server();
    const deadlineMs = 1_000;
    const started = Date.now();
    const res = await createIdempotentFetch({ deadlineMs })(`${s.url}/slow-body`, json({}));
    expect(res.status).toBe(201);
    // The rest of the body comes only once the deadline has passed.
    await new Promise((resolve) => setTimeout(resolve, started + deadlineMs + 100 - Date.now()));
    s.open();
    // The order exists: the caller must get its answer, not a TimeoutError half-way through it.
    expect(await res.text()).toBe('first part, last part');
  });

  it('the total deadline bounds all attempts', async () => {
    const s = await server();
    const { attempts, onAttempt } = recorder();
    const started = Date.now();
    const outcome = await createIdempotentFetch({ baseDelayMs: 100, maxDelayMs: 100, random: () => 1, deadlineMs: 1_500, maxAttempts: 100, onAttempt })(`${s.url}/statuses`, {
      method: 'POST',
      headers: { 'x-statuses': Array(50).fill(503).join(',') },
    }).catch((error: unknown) => error);
    // Where the deadline falls depends on how long each attempt took: in a wait not begun, the last
    // 503 comes back; during an attempt (a loaded machine), RetryDeadlineError. Either way it ends there.
    if (outcome instanceof Response) expect(outcome.status).toBe(503);
    else expect(outcome).toBeInstanceOf(RetryDeadlineError);
    // Retried (a first attempt on a busy machine still leaves time for more), but at 100 ms apart
    // at least 15 fit in 1.5 s, not the 50 the server would answer 503 to.
    expect(attempts.length).toBeGreaterThan(1);
    expect(attempts.length).toBeLessThanOrEqual(16);
    expect(Date.now() - started).toBeLessThan(5_000);
  });

  it('a wait that would pass the deadline is not begun: the last response comes back at once', async () => {
    const s = await server();
    const { attempts, onAttempt } = recorder();
    const res = await createIdempotentFetch({ baseDelayMs: 1, maxDelayMs: 60_000, deadlineMs: 10_000, onAttempt })(`${s.url}/statuses`, {
      method: 'POST',
      headers: { 'x-statuses': '503', 'x-retry-after': '30' },
    });
    expect(res.status).toBe(503);
    expect(attempts.map((a) => [a.status, a.willRetry])).toEqual([[503, false]]);
    expect(s.runs.get('statuses')).toBe(1);
  });

  it('a deadline that ends during a hung attempt rejects with RetryDeadlineError, which names the key to ask again with', async () => {
    const s = await server();
    // The handler is held until the deadline has ended the call.
    const failed = await createIdempotentFetch({ deadlineMs: 100, generateKey: () => 'generated-1' })(`${s.url}/orders?hold=1`, json({})).catch((error: unknown) => error);
    expect(failed).toBeInstanceOf(RetryDeadlineError);
    s.open();
    // Asked again with that key (a manual retry), the caller gets the first run's answer.
    const key = (failed as RetryDeadlineError).key;
    expect(key).toBe('generated-1');
    const again = await vi.waitFor(async () => {
      const res = await createIdempotentFetch({ maxAttempts: 1 })(`${s.url}/orders?hold=1`, { ...json({}), idempotencyKey: key });
      expect(res.status).toBe(201);
      return res;
    }, { timeout: 10_000 });
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect(s.runs.get('orders')).toBe(1);
  });

  it('attemptTimeoutMs: an attempt with no response in time is retried with the same key, and the run it started is replayed', async () => {
    const s = await server();
    const { attempts, onAttempt } = recorder();
    const fetchSafe = createIdempotentFetch({ ...fast, maxDelayMs: 200, maxAttempts: 20, attemptTimeoutMs: 200, deadlineMs: 10_000, onAttempt });
    // The handler is held: the first attempt gets no response within 200 ms, the retries get 409
    // (still running) until it goes on.
    setTimeout(() => s.open(), 600).unref();
    const res = await fetchSafe(`${s.url}/orders?hold=1`, { ...json({}), idempotencyKey: 'attempt-timeout-1' });
    // Before (no per-attempt limit): the one attempt waited, and a silent connection took the whole deadline.
    expect(attempts[0]).toMatchObject({ attempt: 1, willRetry: true, error: expect.objectContaining({ name: 'TimeoutError' }) });
    expect(res.status).toBe(201);
    expect(res.headers.get('idempotent-replayed')).toBe('true');
    expect(s.runs.get('orders')).toBe(1);
    expect(() => createIdempotentFetch({ attemptTimeoutMs: 0 })).toThrow(/`attemptTimeoutMs` must be a positive number/);
  });

  it('attemptTimeoutMs never cuts a body the caller reads after the response came', async () => {
    const s = await server();
    const res = await createIdempotentFetch({ ...fast, attemptTimeoutMs: 100 })(`${s.url}/slow-body`, json({}));
    setTimeout(() => s.open(), 400).unref(); // the rest of the body comes well after 100 ms
    expect(await res.text()).toMatch(/./);
  });

  it('every answer lost: RetryExhaustedError names the key, and asking again with it replays the one run', async () => {
    const s = await server();
    const proxy = await startLossyProxy(s.url, 100);
    open.push(proxy);
    const failed = await createIdempotentFetch({ ...fast, maxAttempts: 3 })(`${proxy.url}/orders`, json({ item: 'book' })).catch((error: unknown) => error);
    // Before, the bare "fetch failed" TypeError came back, with no way to learn the key.
    expect(failed).toBeInstanceOf(RetryExhaustedError);
    const { key, attempts, cause } = failed as RetryExhaustedError;
    expect(attempts).toBe(3);
    expect(cause).toBeInstanceOf(TypeError);
    const again = await createIdempotentFetch(fast)(`${s.url}/orders`, { ...json({ item: 'book' }), idempotencyKey: key });
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect(await again.json()).toEqual({ order: 1, body: { item: 'book' } });
    expect(s.runs.get('orders')).toBe(1);
  });

  it('follows a 307 redirect with the body, on every Node (Node 20 cannot re-send an ArrayBuffer)', async () => {
    const s = await server();
    const { attempts, onAttempt } = recorder();
    const res = await createIdempotentFetch({ ...fast, onAttempt })(`${s.url}/moved-307`, json({ item: 'book' }));
    expect(res.status).toBe(201);
    expect(await res.json()).toEqual({ order: 1, body: { item: 'book' } });
    expect(attempts.map((a) => a.status)).toEqual([201]);
  });

  it('wraps node-fetch: retryable statuses are retried (its bodies are Node streams), the retry succeeds', async () => {
    const s = await server();
    const { attempts, onAttempt } = recorder();
    const fetchSafe = createIdempotentFetch({ ...fast, onAttempt, fetch: nodeFetch as unknown as typeof fetch });
    const res = await fetchSafe(`${s.url}/statuses`, { method: 'POST', headers: { 'x-statuses': '503,429', 'content-type': 'application/json' }, body: '{"a":1}' });
    expect(res.status).toBe(201);
    expect(await res.json()).toEqual({ ok: true, run: 3 });
    expect(attempts.map((a) => a.status)).toEqual([503, 429, 201]);
  });

  // Was: a chunk that is no byte view became `new Uint8Array(chunk)`: a string was sent as no
  // body at all (a number as that many zero bytes), where Node's fetch sends the text.
  it('a stream body of strings is sent as its text (UTF-8) on every attempt, as Node\'s fetch sends it', async () => {
    const s = await server();
    // The first answer is lost (its request may reach the proxy as one chunk or two).
    const proxy = await startLossyProxy(s.url, 2);
    open.push(proxy);
    const text = () => new ReadableStream<string>({ start: (c) => (c.enqueue('{"item":'), c.enqueue('"bücher"}'), c.close()) });
    const { attempts, onAttempt } = recorder();
    const init = { method: 'POST', headers: { 'content-type': 'application/json' }, duplex: 'half' };
    const res = await createIdempotentFetch({ ...fast, onAttempt })(`${proxy.url}/orders`, { ...init, body: text() } as unknown as RequestInit);
    expect(res.status).toBe(201);
    expect(res.headers.get('idempotent-replayed')).toBe('true');
    expect(await res.json()).toEqual({ order: 1, body: { item: 'bücher' } });
    expect(attempts[0]?.error).toBeDefined();
    const sent = s.requests;
    // Anything else a stream yields is refused before a request goes out, as fetch refuses it.
    const numbers = new ReadableStream<number>({ start: (c) => (c.enqueue(5), c.close()) });
    await expect(createIdempotentFetch(fast)(`${s.url}/orders`, { ...init, body: numbers } as unknown as RequestInit)).rejects.toThrow(/Uint8Array/);
    expect(s.requests).toBe(sent);
  });

  // Was: Firefox has no Request.body (it reads undefined, not null: bugzil.la/1387483), and every
  // keyed call rejected with "stream is undefined" before sending anything. Firefox is emulated
  // here by that one getter; the fetch and the server are real.
  it("in Firefox, whose Request has no body stream, the body is still sent, the same on every attempt", async () => {
    const s = await server();
    const proxy = await startLossyProxy(s.url, 1);
    open.push(proxy);
    const firefox = vi.spyOn(Request.prototype, 'body', 'get').mockReturnValue(undefined as unknown as null);
    try {
      const { attempts, onAttempt } = recorder();
      const res = await createIdempotentFetch({ ...fast, onAttempt })(`${proxy.url}/orders`, json({ item: 'fox' }));
      expect(res.status).toBe(201);
      expect(res.headers.get('idempotent-replayed')).toBe('true');
      expect(await res.json()).toEqual({ order: 1, body: { item: 'fox' } });
      expect(attempts.map((a) => a.status ?? 'network-error')).toEqual(['network-error', 201]);
      // A Request as input, a request without a body, and maxBodyBytes.
      const fromRequest = await createIdempotentFetch(fast)(new Request(`${s.url}/orders`, json({ item: 'req' })));
      expect(await fromRequest.json()).toEqual({ order: 2, body: { item: 'req' } });
      expect((await createIdempotentFetch(fast)(`${s.url}/statuses`, { method: 'POST' })).status).toBe(201);
      // A keyed GET (in `methods`) has no body to send, not an empty one fetch would refuse.
      expect((await createIdempotentFetch({ ...fast, methods: ['GET', 'POST'] })(`${s.url}/orders`)).status).toBe(200);
      const sent = s.requests;
      await expect(createIdempotentFetch({ ...fast, maxBodyBytes: 10 })(`${s.url}/orders`, json({ item: 'too long' }))).rejects.toThrow(/over maxBodyBytes \(10 bytes\)/);
      expect(s.requests).toBe(sent);
    } finally {
      firefox.mockRestore();
    }
  });

  it('takes a null init, as fetch does', async () => {
    const s = await server();
    const res = await createIdempotentFetch()(`${s.url}/orders`, null as unknown as undefined);
    expect(res.status).toBe(200);
  });

  it('leaves methods without idempotency alone: no key, one attempt, the init as it came', async () => {
    // A 503 would be retried on a covered method; a GET must go out once, as it is, and come back.
    const calls: Array<{ key: string | null; init: RequestInit | undefined }> = [];
    const fetchSafe = createIdempotentFetch({
      fetch: async (_input, init) => {
        calls.push({ key: new Headers(init?.headers).get('idempotency-key'), init });
        return new Response('busy', { status: 503 });
      },
    });
    const res = await fetchSafe('http://127.0.0.1:1/orders');
    expect(res.status).toBe(503);
    const init = { headers: { accept: 'application/json' } };
    await fetchSafe('http://127.0.0.1:1/orders', init);
    // Not even an empty init where none was given: on Node 24 `{}` resets a Request's referrer.
    expect(calls).toEqual([
      { key: null, init: undefined },
      { key: null, init },
    ]);
    expect(calls[1]?.init).toBe(init);
  });

  it('keeps a key the caller already set in the headers, and makes a new key per operation', async () => {
    const s = await server();
    const { attempts, onAttempt } = recorder();
    const fetchSafe = createIdempotentFetch({ onAttempt });
    await fetchSafe(`${s.url}/orders`, { method: 'POST', headers: { 'Idempotency-Key': 'mine' }, body: '{}' });
    await fetchSafe(`${s.url}/orders`, json({}));
    await fetchSafe(`${s.url}/orders`, json({}));
    expect(attempts[0]?.key).toBe('mine');
    expect(new Set(attempts.map((a) => a.key)).size).toBe(3);
    expect(s.runs.get('orders')).toBe(3);
  });
  // Was: the key lookup built a Headers from init.headers, which used up an iterator, and the
  // Request was then built from the empty rest: Authorization and the key were not sent.
  it('takes headers given as a one-shot iterator (a Map\'s entries, a generator), as fetch does', async () => {
    const s = await server();
    const fetchSafe = createIdempotentFetch(fast);
    // Any iterable of pairs is a HeadersInit to fetch; Node's typings list arrays and records only.
    const entries = () => new Map([['authorization', 'Bearer t'], ['Idempotency-Key', 'iter-1'], ['content-type', 'application/json']]).entries() as unknown as HeadersInit;
    const first = await fetchSafe(`${s.url}/whoami`, { method: 'POST', headers: entries(), body: '{}' });
    expect(await first.json()).toEqual({ authorization: 'Bearer t', key: 'iter-1', run: 1 });
    // The same key from a generator: the stored answer comes back.
    function* generated(): Generator<[string, string]> {
      yield ['authorization', 'Bearer t'];
      yield ['idempotency-key', 'iter-1'];
    }
    const again = await fetchSafe(`${s.url}/whoami`, { method: 'POST', headers: generated() as unknown as HeadersInit, body: '{}' });
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    // An iterator's undefined key is refused as an object's is, not sent as the text "undefined".
    const unset = new Map([['idempotency-key', undefined]]).entries() as unknown as HeadersInit;
    await expect(fetchSafe(`${s.url}/whoami`, { method: 'POST', headers: unset, body: '{}' })).rejects.toThrow(/The Idempotency-Key header in init\.headers is undefined/);
    expect(s.runs.get('whoami')).toBe(1);
  });
});

describe('what is not retried, and what cannot hold a call up', () => {
  it('a Request with a body and a method without idempotency goes out untouched (it used to throw)', async () => {
    const s = await server();
    const fetchSafe = createIdempotentFetch(fast);
    const res = await fetchSafe(new Request(`${s.url}/things`, { method: 'PUT', headers: { 'content-type': 'application/json' }, body: '{"a":1}' }));
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ runs: 1, body: { a: 1 } });
  });

  it.each([
    ['no Retry-After', undefined],
    ['a Retry-After that is no delay ("in 5")', 'in 5'],
  ])("an application's own 409 (%s) is returned at once: retrying would run it again", async (_, retryAfter) => {
    const s = await server();
    const { attempts, onAttempt } = recorder();
    const res = await createIdempotentFetch({ ...fast, onAttempt })(`${s.url}/statuses`, {
      method: 'POST',
      headers: { 'x-statuses': '409', ...(retryAfter ? { 'x-retry-after': retryAfter } : {}) },
    });
    expect(res.status).toBe(409);
    expect(attempts.map((a) => a.willRetry)).toEqual([false]);
    expect(s.runs.get('statuses')).toBe(1);
  });

  // Was: retried as a lost connection would be: five requests (each may run the operation on
  // another server), then RetryExhaustedError.
  it("fetch's own refusal (redirect: 'error' meeting a redirect) is not retried: one request, fetch's error", async () => {
    const s = await server();
    const { attempts, onAttempt } = recorder();
    const error = await createIdempotentFetch({ ...fast, onAttempt })(`${s.url}/moved`, { ...json({}), redirect: 'error' }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(TypeError);
    expect((error as Error).cause).toMatchObject({ message: 'unexpected redirect' });
    expect(s.requests).toBe(1);
    expect(attempts.map((a) => [a.error, a.willRetry])).toEqual([[error, false]]);
    // node-fetch names the kind in its error's type.
    const nodeFetchError = await createIdempotentFetch({ ...fast, fetch: nodeFetch as unknown as typeof fetch })(`${s.url}/moved`, { ...json({}), redirect: 'error' }).catch((e: unknown) => e);
    expect(nodeFetchError).toMatchObject({ name: 'FetchError', type: 'no-redirect' });
    expect(s.requests).toBe(2);
  });

  // Was: retried maxAttempts times (they carry an error code, as network failures do), ending in
  // a RetryExhaustedError that said the request may have run, when none had gone out.
  it("fetch's refusal of a header it never sends (Expect, Transfer-Encoding) or a wrong Content-Length is not retried: no request, fetch's error", async () => {
    const s = await server();
    for (const [name, value, code] of [
      ['expect', '100-continue', 'UND_ERR_NOT_SUPPORTED'],
      ['transfer-encoding', 'chunked', 'UND_ERR_INVALID_ARG'],
      ['content-length', '99', 'UND_ERR_REQ_CONTENT_LENGTH_MISMATCH'],
    ] as const) {
      const { attempts, onAttempt } = recorder();
      const error = await createIdempotentFetch({ ...fast, onAttempt })(`${s.url}/orders`, { method: 'POST', headers: { [name]: value }, body: '{}' }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(TypeError);
      expect((error as Error).cause).toMatchObject({ code });
      expect(attempts.map((a) => [a.error, a.willRetry])).toEqual([[error, false]]);
    }
    expect(s.requests).toBe(0);
  });

  it('network errors are still retried: a connection reset, a refused connection', async () => {
    const { createServer } = await import('node:http');
    let requests = 0;
    const resetting = createServer((req, res) => {
      // The first request's connection is reset (ECONNRESET), the second one answered.
      if (++requests === 1) return void req.socket.resetAndDestroy();
      res.writeHead(201).end('made');
    });
    await new Promise<void>((resolve) => resetting.listen(0, '127.0.0.1', resolve));
    open.push({ close: () => new Promise<void>((resolve) => resetting.close(() => resolve())) });
    const { attempts, onAttempt } = recorder();
    const res = await createIdempotentFetch({ ...fast, onAttempt })(`http://127.0.0.1:${(resetting.address() as { port: number }).port}/`, json({}));
    expect(res.status).toBe(201);
    expect(attempts.map((a) => (a.error as Error | undefined)?.cause ?? a.status)).toEqual([expect.objectContaining({ code: 'ECONNRESET' }), 201]);
    const url = `http://127.0.0.1:${(resetting.address() as { port: number }).port}/`;
    resetting.closeAllConnections();
    await new Promise<void>((resolve) => resetting.close(() => resolve()));
    const refused = await createIdempotentFetch({ ...fast, maxAttempts: 3 })(url, json({})).catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(RetryExhaustedError);
    expect(refused).toMatchObject({ attempts: 3, cause: { cause: { code: 'ECONNREFUSED' } } });
  });

  it('an abort from inside onAttempt rejects, even on the last attempt that got an answer', async () => {
    const s = await server();
    const controller = new AbortController();
    const fetchSafe = createIdempotentFetch({ ...fast, onAttempt: () => controller.abort(new Error('user left in onAttempt')) });
    await expect(fetchSafe(`${s.url}/orders`, { ...json({ a: 1 }), signal: controller.signal })).rejects.toThrow('user left in onAttempt');
    expect(s.runs.get('orders')).toBe(1);
  });

  it('a last attempt without an answer rejects with RetryExhaustedError, even after earlier answers', async () => {
    // The first answer (503) comes through, the second is lost: that run may have made the order.
    const s = await server();
    const proxy = await startLossyProxy(s.url, (n) => n === 2);
    open.push(proxy);
    const { attempts, onAttempt } = recorder();
    const failed = await createIdempotentFetch({ ...fast, maxAttempts: 2, onAttempt })(`${proxy.url}/statuses`, {
      method: 'POST',
      headers: { 'x-statuses': '503' },
    }).catch((error: unknown) => error);
    expect(attempts.map((a) => a.status ?? 'network-error')).toEqual([503, 'network-error']);
    expect(failed).toBeInstanceOf(RetryExhaustedError);
    expect((failed as RetryExhaustedError).message).toContain('No response to the last of 2 attempt(s)');
    expect(s.runs.get('statuses')).toBe(2);
  });

  it('a page without crypto.randomUUID (plain http://) still gets a random UUID v4 key', async () => {
    const s = await server();
    const proto = Object.getPrototypeOf(globalThis.crypto) as object;
    const own = Object.getOwnPropertyDescriptor(proto, 'randomUUID');
    const { attempts, onAttempt } = recorder();
    Object.defineProperty(proto, 'randomUUID', { value: undefined, configurable: true });
    try {
      const fetchSafe = createIdempotentFetch({ ...fast, onAttempt });
      expect((await fetchSafe(`${s.url}/orders`, json({ a: 1 }))).status).toBe(201);
      expect((await fetchSafe(`${s.url}/orders`, json({ a: 1 }))).status).toBe(201);
    } finally {
      if (own) Object.defineProperty(proto, 'randomUUID', own);
    }
    const keys = attempts.map((a) => a.key);
    for (const key of keys) expect(key).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    expect(new Set(keys).size).toBe(2);
    expect(s.runs.get('orders')).toBe(2);
  });

  it('a replayed 5xx is returned, not asked again: the same key gets the same stored answer', async () => {
    const s = await server({ storable: () => true });
    const { attempts, onAttempt } = recorder();
    const res = await createIdempotentFetch({ ...fast, onAttempt })(`${s.url}/statuses`, { method: 'POST', headers: { 'x-statuses': '500' } });
    expect(res.status).toBe(500);
    expect(res.headers.get('idempotent-replayed')).toBe('true');
    expect(attempts.map((a) => a.willRetry)).toEqual([true, false]);
    expect(s.runs.get('statuses')).toBe(1);
  });

  it('an abort while the body is still being read rejects at once, and cancels the body', async () => {
    const controller = new AbortController();
    let cancelled = false;
    const endless = new ReadableStream<Uint8Array>({
      pull: () => new Promise((resolve) => setTimeout(resolve, 50)),
      cancel: () => void (cancelled = true),
    });
    const call = createIdempotentFetch(fast)('http://127.0.0.1:9/never', { method: 'POST', body: endless, duplex: 'half', signal: controller.signal } as RequestInit);
    setTimeout(() => controller.abort(new Error('user left')), 100);
    await expect(call).rejects.toThrow('user left');
    expect(cancelled).toBe(true);
  });

  // Was: the discarded answer's body was cancelled and awaited, and cancelling one of two clones
  // waits for the other: the retry waited for the deadline (RetryDeadlineError after 1 attempt).
  it('a wrapped fetch that keeps a clone of each answer does not hold up the retry', async () => {
    const s = await server();
    const clones: Response[] = [];
    // A logging or caching wrapper: it keeps a copy, to read only if it wants to.
    const keeping: typeof fetch = async (url, init) => {
      const res = await fetch(url, init);
      clones.push(res.clone());
      return res;
    };
    const { attempts, onAttempt } = recorder();
    const res = await createIdempotentFetch({ ...fast, deadlineMs: 5_000, fetch: keeping, onAttempt })(`${s.url}/statuses`, {
      method: 'POST',
      headers: { 'x-statuses': '503' },
    });
    expect(res.status).toBe(201);
    expect(attempts.map((a) => a.status)).toEqual([503, 201]);
    expect(clones).toHaveLength(2);
  });

  it('a wrapped fetch that ignores the signal still cannot outlast the deadline', async () => {
    const deaf: typeof fetch = () => new Promise<Response>(() => undefined);
    const started = Date.now();
    await expect(createIdempotentFetch({ ...fast, fetch: deaf, deadlineMs: 200 })('http://127.0.0.1:9/x', { method: 'POST' })).rejects.toBeInstanceOf(RetryDeadlineError);
    expect(Date.now() - started).toBeLessThan(5_000);
  });

  it("a keyed Request keeps its referrer and referrer policy on every attempt (copying a Request resets them)", async () => {
    const s = await server();
    const seen: RequestInit[] = [];
    const watching: typeof fetch = (url, init) => (seen.push(init ?? {}), fetch(url, init));
    const request = new Request(`${s.url}/referer`, { method: 'POST', referrer: `${s.url}/checkout`, referrerPolicy: 'unsafe-url', body: '{}' });
    expect((await createIdempotentFetch({ ...fast, fetch: watching })(request)).status).toBe(200);
    // What the wrapped fetch is told (whether Node's fetch then sends a Referer differs by version).
    expect(seen.map((init) => [init.referrer, init.referrerPolicy])).toEqual([[`${s.url}/checkout`, 'unsafe-url']]);
  });

  it("a Request of another fetch implementation is refused with a clear error, not sent without its key", async () => {
    const foreign = { url: 'http://127.0.0.1:9/orders', method: 'POST', headers: new Headers() } as unknown as Request;
    await expect(createIdempotentFetch(fast)(foreign)).rejects.toThrow(/another fetch implementation/);
  });

  it('an abort during an attempt is not reported as a retry', async () => {
    const s = await server();
    const { attempts, onAttempt } = recorder();
    const controller = new AbortController();
    const call = createIdempotentFetch({ ...fast, onAttempt })(`${s.url}/orders?hold=1`, { ...json({ a: 1 }), signal: controller.signal });
    await vi.waitFor(() => expect(s.runs.get('orders')).toBe(1), { timeout: 10_000 });
    controller.abort(new Error('user left'));
    await expect(call).rejects.toThrow('user left');
    s.open();
    expect(attempts.filter((a) => a.willRetry)).toEqual([]);
  });

  it('a signal aborted before the call cancels a stream body, as fetch does', async () => {
    let cancelled = false;
    const body = new ReadableStream<Uint8Array>({ pull: () => undefined, cancel: () => void (cancelled = true) });
    const call = createIdempotentFetch(fast)('http://127.0.0.1:9/x', { method: 'POST', body, duplex: 'half', signal: AbortSignal.abort(new Error('gone')) } as RequestInit);
    await expect(call).rejects.toThrow('gone');
    expect(cancelled).toBe(true);
  });

  it('an async onAttempt that rejects is no unhandled rejection', async () => {
    const s = await server();
    await noUnhandledRejection(async () => {
      const res = await createIdempotentFetch({ ...fast, onAttempt: async () => { throw new Error('async log down'); } })(`${s.url}/orders`, json({ a: 1 }));
      expect(res.status).toBe(201);
    });
  });

  it('signals that are already aborted, or abort during a wait, reject cleanly: no request, no unhandled rejection', async () => {
    const s = await server();
    await noUnhandledRejection(async () => {
      // No body to read first: the attempt itself meets the aborted signal.
      await expect(createIdempotentFetch(fast)(`${s.url}/orders`, { method: 'POST', signal: AbortSignal.abort(new Error('gone')) })).rejects.toThrow('gone');
      // The deadline passes while onAttempt blocks, before the wait: the wait ends with it.
      const blocking = () => {
        const until = Date.now() + 400;
        while (Date.now() < until) {
          // busy: a slow synchronous logger
        }
      };
      const slow = createIdempotentFetch({ baseDelayMs: 100, maxDelayMs: 100, random: () => 1, deadlineMs: 300, onAttempt: blocking });
      await expect(slow(`${s.url}/statuses`, { method: 'POST', headers: { 'x-statuses': '503,503' } })).rejects.toBeInstanceOf(RetryDeadlineError);
      expect(s.runs.get('orders')).toBeUndefined();
      expect(s.runs.get('statuses')).toBe(1);
    });
  });

  // Was: globalThis.fetch was kept when the client was made, so a client made at import time
  // bypassed a fetch patched later (msw's setupServer().listen() in beforeAll), and its requests
  // went to the network instead.
  it('without a `fetch` option, uses the global fetch of the time of the call, not of the creation', async () => {
    const s = await server();
    const fetchSafe = createIdempotentFetch(fast);
    const original = globalThis.fetch;
    const seen: string[] = [];
    globalThis.fetch = (input, init) => {
      seen.push(`${init?.method ?? 'GET'} ${String(input)}`);
      return original(input, init);
    };
    try {
      expect((await fetchSafe(`${s.url}/orders`, json({ item: 'late' }))).status).toBe(201);
      expect((await fetchSafe(`${s.url}/orders`)).status).toBe(200);
      expect(seen).toEqual([`POST ${s.url}/orders`, `GET ${s.url}/orders`]);
    } finally {
      globalThis.fetch = original;
    }
  });

  it('a custom fetch that returns a Response itself (a mock) works, and URL-like inputs are URLs', async () => {
    const s = await server();
    let calls = 0;
    const direct = ((url: string | URL | Request) => (calls++, new Response(`to ${String(url)}`, { status: 201 }))) as unknown as typeof fetch;
    expect((await createIdempotentFetch({ ...fast, fetch: direct })(`${s.url}/orders`, json({ a: 1 }))).status).toBe(201);
    expect(calls).toBe(1);
    // Not a Request, only something that prints as a URL: fetch accepts it, so do we.
    const urlLike = { toString: () => `${s.url}/orders` } as unknown as string;
    expect((await createIdempotentFetch(fast)(urlLike, json({ a: 1 }))).status).toBe(201);
  });

  it('an onAttempt that throws does not cost the caller the response', async () => {
    const s = await server();
    const res = await createIdempotentFetch({ ...fast, onAttempt: () => { throw new Error('logging down'); } })(`${s.url}/orders`, json({ a: 1 }));
    expect(res.status).toBe(201);
  });
});

describe('retry rules', () => {
  it('backoff grows exponentially with full jitter and a cap', () => {
    expect(backoffDelay(1, 100, 1_000, () => 1)).toBe(100);
    expect(backoffDelay(3, 100, 1_000, () => 1)).toBe(400);
    expect(backoffDelay(10, 100, 1_000, () => 1)).toBe(1_000);
    expect(backoffDelay(3, 100, 1_000, () => 0)).toBe(0);
  });

  it('of two Retry-After lines takes the first, and reads no date out of bare numbers', () => {
    expect(parseRetryAfter('2, 2')).toBe(2_000);
    expect(parseRetryAfter('5,7')).toBe(5_000);
    expect(parseRetryAfter('1 2')).toBeUndefined();
    // HTTP dates carry commas themselves: two joined lines still give the first date.
    const now = Date.parse('Sun, 29 Nov 2026 18:00:00 GMT');
    expect(parseRetryAfter('Sun, 29 Nov 2026 18:00:05 GMT, Sun, 29 Nov 2026 18:00:09 GMT', now)).toBe(5_000);
    expect(parseRetryAfter('2, x')).toBe(2_000);
  });

  it('reads only the HTTP date forms, and asctime as GMT whatever the machine\'s zone', () => {
    // Date.parse takes all of these for dates long past: each would have meant "retry at once".
    for (const junk of ['in 5', 'foo 1', '5 May', 'x, 2', 'x 2026', 'tomorrow', 'Sun, 29 Nov 2026 18:00:05 GMT garbage']) {
      expect(parseRetryAfter(junk), junk).toBeUndefined();
    }
    const now = Date.parse('Sun, 29 Nov 2026 18:00:00 GMT');
    expect(parseRetryAfter('Sunday, 29-Nov-26 18:00:07 GMT', now)).toBe(7_000);
    const zone = process.env['TZ'];
    try {
      for (const tz of ['America/Los_Angeles', 'Asia/Tokyo', 'UTC']) {
        process.env['TZ'] = tz;
        expect(parseRetryAfter('Sun Nov 29 18:00:10 2026', now), tz).toBe(10_000);
      }
    } finally {
      if (zone === undefined) delete process.env['TZ'];
      else process.env['TZ'] = zone;
    }
  });

  it('parses Retry-After as seconds or an HTTP date', () => {
    expect(parseRetryAfter('3')).toBe(3_000);
    expect(parseRetryAfter(new Date(Date.now() + 10_000).toUTCString())! / 1000).toBeGreaterThan(8);
    expect(parseRetryAfter('soon')).toBeUndefined();
    expect(parseRetryAfter(null)).toBeUndefined();
  });

  it('validates its options', () => {
    expect(() => createIdempotentFetch({ maxAttempts: 0 })).toThrow(/maxAttempts/);
    expect(() => createIdempotentFetch({ maxAttempts: 2.5 })).toThrow('`maxAttempts` must be a whole number, at least 1.');
    // A timer fires at once past 2^31 - 1 ms: such a deadline would fail every call.
    expect(() => createIdempotentFetch({ deadlineMs: 2 ** 31 })).toThrow(/`deadlineMs` must be at most 2147483647/);
    expect(() => createIdempotentFetch({ retryOn: 503 as never })).toThrow('`retryOn` must be a function.');
    // null means "not given", as for every other option (`onAttempt: debug ? log : null`).
    expect(() => createIdempotentFetch({ onAttempt: null, generateKey: null, retryOn: null, random: null } as never)).not.toThrow();
  });

  // Was: the body went out as the text "[object Blob]" (seen with jsdom's Blob): vitest's jsdom
  // environment puts jsdom's Blob on the global beside Node's fetch, and the body was held in one.
  it("sends the body itself when the global Blob is not fetch's (a DOM emulation's, as under vitest's jsdom environment)", async () => {
    const s = await server();
    // Built before the swap: what a test file's imports would have made of the real one.
    const fetchSafe = createIdempotentFetch(fast);
    class ForeignBlob {
      readonly [Symbol.toStringTag] = 'Blob';
      constructor(readonly parts: unknown[]) {}
    }
    vi.stubGlobal('Blob', ForeignBlob);
    try {
      const res = await fetchSafe(`${s.url}/orders`, json({ item: 'book' }));
      expect(res.status).toBe(201);
      expect(await res.json()).toEqual({ order: 1, body: { item: 'book' } });
    } finally {
      vi.unstubAllGlobals();
    }
  });

  // Was: NaN made every wait NaN, and `now + NaN < deadline` is false, so a 503 came back with
  // no retry and no word; a value out of range skewed the waits (negative: back to back).
  it('a `random` giving no number from 0 to 1 rejects the call with a TypeError naming it, instead of silently not retrying', async () => {
    // One server per call: /statuses answers its list once per server, not per call.
    for (const [value, shown] of [[Number.NaN, 'NaN'], [-0.5, '-0.5'], [2, '2'], [undefined, 'undefined']] as const) {
      const s = await server();
      const call = createIdempotentFetch({ ...fast, random: () => value as number })(`${s.url}/statuses`, { method: 'POST', headers: { 'x-statuses': '503' } });
      await expect(call).rejects.toThrow(new TypeError(`[idemkit] [client] \`random\` must return a number from 0 to 1, as Math.random does; it returned ${shown}.`));
    }
    // Its own error is the call's too, as retryOn's is.
    const s = await server();
    const broken = createIdempotentFetch({ ...fast, random: () => { throw new Error('entropy pool empty'); } });
    await expect(broken(`${s.url}/statuses`, { method: 'POST', headers: { 'x-statuses': '503' } })).rejects.toThrow('entropy pool empty');
    // Never asked when there is nothing to wait for: an answer that is not retried comes back.
    const unused = await createIdempotentFetch({ random: () => Number.NaN })(`${(await server()).url}/statuses`, { method: 'POST' });
    expect(unused.status).toBe(201);
    // 0 and 1 are its bounds, both taken.
    for (const value of [0, 1]) {
      const s = await server();
      const res = await createIdempotentFetch({ ...fast, random: () => value })(`${s.url}/statuses`, { method: 'POST', headers: { 'x-statuses': '503' } });
      expect(res.status).toBe(201);
    }
  });

  // Was: sent. A browser drops the key from a no-cors request (only CORS-safelisted headers
  // go out), so every retry reached the server as a new request: a second order.
  it("refuses a keyed request with mode 'no-cors' before anything is sent or read", async () => {
    const s = await server();
    const fetchSafe = createIdempotentFetch(fast);
    const refusal = "[idemkit] [client] A POST with mode 'no-cors' cannot carry the Idempotency-Key header";
    await expect(fetchSafe(`${s.url}/orders`, { ...json({ item: 'a' }), mode: 'no-cors' })).rejects.toThrow(refusal);
    // On a Request too; its body stays unread, so it can be sent another way.
    const request = new Request(`${s.url}/orders`, { ...json({ item: 'b' }), mode: 'no-cors' });
    await expect(fetchSafe(request)).rejects.toThrow(TypeError);
    expect(request.bodyUsed).toBe(false);
    // init overrides the Request's mode, as with fetch.
    expect((await fetchSafe(request, { mode: 'cors' })).status).toBe(201);
    expect(s.requests).toBe(1);
    // A method sent once, untouched, keeps whatever mode it has.
    expect((await fetchSafe(`${s.url}/orders`, { mode: 'no-cors' })).status).toBe(200);
  });

  // Was: accepted, and then every call rejected with Headers' own TypeError.
  it('refuses a header name fetch could not send, at creation', () => {
    for (const header of ['Bad Name', '', 'Idempotency-Key:', 'Schlüssel', 42 as never]) {
      expect(() => createIdempotentFetch({ header })).toThrow(/^\[idemkit\] \[client\] `header` must be a header name/);
    }
    expect(() => createIdempotentFetch({ header: 'X-Request-Key' })).not.toThrow();
    expect(() => createIdempotentFetch({ header: "a!#$%&'*+-.^_`|~9" })).not.toThrow();
  });

  it('warns about an option it does not know (a misspelt one would keep its default)', () => {
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => undefined);
    try {
      createIdempotentFetch({ maxAttempt: 1, ...fast } as never);
      expect(warn).toHaveBeenCalledTimes(1);
      expect(warn.mock.calls[0]?.[0]).toBe('[idemkit] [client] Unknown option(s) ignored: maxAttempt.');
      createIdempotentFetch({ maxAttempts: 1, ...fast });
      expect(warn).toHaveBeenCalledTimes(1);
    } finally {
      warn.mockRestore();
    }
  });

  it('refuses an empty key before sending anything (the server would answer 400, which is not retried)', async () => {
    const s = await server();
    const plain = createIdempotentFetch(fast);
    await expect(plain(`${s.url}/orders`, { ...json({}), idempotencyKey: '' })).rejects.toThrow(/idempotency key must be a non-empty string .*got ""/);
    await expect(plain(`${s.url}/orders`, { method: 'POST', headers: { 'Idempotency-Key': '  ' }, body: '{}' })).rejects.toThrow(TypeError);
    await expect(createIdempotentFetch({ ...fast, generateKey: () => '' })(`${s.url}/orders`, json({}))).rejects.toThrow(/non-empty string/);
    await expect(createIdempotentFetch({ ...fast, generateKey: () => 42 as never })(`${s.url}/orders`, json({}))).rejects.toThrow(/got 42/);
    await expect(createIdempotentFetch({ ...fast, generateKey: (async () => 'k') as never })(`${s.url}/orders`, json({}))).rejects.toThrow(/got a promise/);
    await expect(plain(`${s.url}/orders`, { ...json({}), idempotencyKey: 5n as never })).rejects.toThrow(/got 5n/);
    // A caller's Request is left unread, so it can be sent again with a proper key.
    const request = new Request(`${s.url}/orders`, { method: 'POST', headers: { 'Idempotency-Key': ' ', 'content-type': 'application/json' }, body: '{"a":1}' });
    await expect(plain(request)).rejects.toThrow(/non-empty string/);
    await expect(plain(request, { idempotencyKey: '' })).rejects.toThrow(/non-empty string/);
    expect(request.bodyUsed).toBe(false);
    expect(s.requests).toBe(0);
    expect((await plain(request, { idempotencyKey: 'k-from-request' })).status).toBe(201);
    // A real key still goes through.
    expect((await plain(`${s.url}/orders`, { ...json({}), idempotencyKey: 'k-1' })).status).toBe(201);
    expect(s.runs.get('orders')).toBe(2);
  });

  it('refuses a key header given as undefined or null (plain JavaScript), which would go out as the text "undefined"', async () => {
    const s = await server();
    const fetchSafe = createIdempotentFetch(fast);
    for (const headers of [{ 'Idempotency-Key': undefined }, { 'idempotency-key': null }, [['IDEMPOTENCY-KEY', undefined]]]) {
      await expect(fetchSafe(`${s.url}/orders`, { ...json({ a: 1 }), headers: headers as unknown as HeadersInit })).rejects.toThrow(
        /The Idempotency-Key header in init\.headers is (undefined|null)/,
      );
    }
    expect(s.runs.get('orders') ?? 0).toBe(0);
  });

  // Was: `idempotencyKey: null` skipped the check (it tested for undefined only), yet `??` then
  // read the header: every such call sent the key "undefined", and the second got the first's answer.
  it('refuses an undefined key header when idempotencyKey is null, which gives no key either', async () => {
    const s = await server();
    const fetchSafe = createIdempotentFetch(fast);
    for (const item of ['book', 'book']) {
      const init = { ...json({ item }), headers: { 'content-type': 'application/json', 'Idempotency-Key': undefined } as unknown as HeadersInit, idempotencyKey: null as unknown as undefined };
      await expect(fetchSafe(`${s.url}/orders`, init)).rejects.toThrow(/The Idempotency-Key header in init\.headers is undefined/);
    }
    expect(s.requests).toBe(0);
  });

  it('a key given as idempotencyKey is used even when the headers hold an undefined key header', async () => {
    const s = await server();
    const res = await createIdempotentFetch(fast)(`${s.url}/orders`, { ...json({ a: 1 }), headers: { 'content-type': 'application/json', 'Idempotency-Key': undefined } as unknown as HeadersInit, idempotencyKey: 'given-1' });
    expect(res.status).toBe(201);
    expect(s.runs.get('orders')).toBe(1);
  });

  it('RetryExhaustedError says why the network failed (fetch only says "fetch failed")', async () => {
    const s = await server();
    const url = s.url;
    await s.close();
    const failed = await createIdempotentFetch({ ...fast, maxAttempts: 2 })(`${url}/orders`, json({})).catch((error: unknown) => error);
    expect(failed).toBeInstanceOf(RetryExhaustedError);
    expect((failed as Error).message).toMatch(/fetch failed \(ECONNREFUSED\)/);
  });

  it('refuses a key the server would answer 400 for, before sending anything', async () => {
    const s = await server();
    const plain = createIdempotentFetch(fast);
    const refused: Array<[string, RegExp]> = [
      ['k'.repeat(256), /is 256 characters long; at most 255/],
      ['café-1', /printable ASCII/],
      ['a\tb', /printable ASCII/],
      ['заказ-1', /printable ASCII/],
      ['order-1,retry', /holds a comma/],
      ['  padded  ', /starts or ends with a space/],
    ];
    for (const [idempotencyKey, message] of refused) {
      // Before: sent, and answered 400 key-invalid (or a Headers ByteString error for Cyrillic).
      await expect(plain(`${s.url}/orders`, { ...json({}), idempotencyKey })).rejects.toThrow(message);
    }
    await expect(createIdempotentFetch({ ...fast, generateKey: () => 'x,y' })(`${s.url}/orders`, json({}))).rejects.toThrow(/holds a comma/);
    expect(s.requests).toBe(0);
    // The longest bare key, and a quoted key holding a comma (the draft's form), go through.
    expect((await plain(`${s.url}/orders`, { ...json({}), idempotencyKey: 'k'.repeat(255) })).status).toBe(201);
    expect((await plain(`${s.url}/orders`, { ...json({}), idempotencyKey: '"order-1,retry"' })).status).toBe(201);
    expect(s.runs.get('orders')).toBe(2);
  });
  // Was: a key starting with `"` skipped every check. `'"中"'` failed with Headers' ByteString
  // error after a Request's body had been read; `'""'` went out and came back 400.
  it('checks a quoted (structured-field) key by the same rules, inside its quotes, before anything is sent', async () => {
    const s = await server();
    const plain = createIdempotentFetch(fast);
    const refused: Array<[string, RegExp]> = [
      ['""', /is empty between its quotes/],
      ['"中"', /printable ASCII characters only .*between its quotes/],
      ['"a\tb"', /printable ASCII/],
      [`"${'k'.repeat(256)}"`, /is 256 characters long; at most 255 are allowed between its quotes/],
      ['"order-1', /closing `"` is missing/],
      ['"a\\b"', /a backslash may only escape/],
      ['"order-1" x', /only parameters/],
      // Parameters a structured-field parser refuses (RFC 9651): each was sent, for a 400.
      ...['"abc";', '"abc";A=1', '"abc";a=', '"abc";a=1;', '"abc";a=b c', '"abc";a="x', '"abc";1a', '"abc";a=1,b', '"abc";a=?2'].map(
        (key): [string, RegExp] => [key, /only parameters/],
      ),
      // Byte sequences that are no base64, a date that is no integer (or has a parameter after
      // it, which the server's parser refuses), display strings that are no lower-case
      // percent-encoded UTF-8: each was sent, for a 400.
      ...['"abc";a=:a:', '"abc";a=:abcde:', '"abc";a=:YQ=:', '"abc";a=@1.5', '"abc";a=%"%ff"', '"abc";a=%"%C3%A9"', '"abc";a=%"%c3"', '"abc";a=@1;b=2'].map(
        (key): [string, RegExp] => [key, /only parameters/],
      ),
    ];
    for (const [idempotencyKey, message] of refused) {
      // The server's own parser refuses each of them too (a 400, which is not retried).
      expect(parseKeyHeader(idempotencyKey).ok).toBe(false);
      await expect(plain(`${s.url}/orders`, { ...json({}), idempotencyKey })).rejects.toThrow(message);
      // A caller's Request is left unread, so it can be sent again with a proper key.
      const request = new Request(`${s.url}/orders`, { method: 'POST', body: 'keep me' });
      const error = await plain(request, { idempotencyKey }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(TypeError);
      expect((error as Error).message).toMatch(/^\[idemkit\] \[client\] The idempotency key/);
      expect(request.bodyUsed).toBe(false);
    }
    expect(s.requests).toBe(0);
    // What the server takes goes through: spaces, an escaped quote, a comma, 255 characters, parameters.
    const accepted = ['" "', '"a\\"b"', '"a,b"', `"${'k'.repeat(255)}"`, '"order-2";v=1', '"order-3";a; b=-1.5;c=?1', '"order-4";a="x y";b=tok/en;c=:AQ==:', '"order-5";a=:YQ:;c=%"%c3%a9 x";d=::;b=@-1'];
    for (const idempotencyKey of accepted) {
      expect(parseKeyHeader(idempotencyKey).ok).toBe(true);
      expect((await plain(`${s.url}/orders`, { ...json({}), idempotencyKey })).status).toBe(201);
    }
    expect(s.runs.get('orders')).toBe(accepted.length);
  });
});

describe('an abort while the caller reads the body, after garbage collection', () => {
  // In a child process with --expose-gc: the link from the caller's signal to the fetch went
  // through a Request nothing else held, which Node links weakly.
  const script = `
    import { createServer } from 'node:http';
    import { createIdempotentFetch } from './dist/index.js';
    const server = createServer((req, res) => {
      res.writeHead(201, { 'content-type': 'text/plain' });
      res.write('first ');
      const t = setInterval(() => res.write('more '), 50);
      res.on('close', () => clearInterval(t));
    });
    await new Promise((r) => server.listen(0, '127.0.0.1', r));
    const url = 'http://127.0.0.1:' + server.address().port + '/orders';
    const fetchSafe = createIdempotentFetch();
    const outcomes = [];
    for (const form of ['init', 'request']) {
      const controller = new AbortController();
      const response = form === 'init'
        ? await fetchSafe(url, { method: 'POST', body: 'b', signal: controller.signal })
        : await fetchSafe(new Request(url, { method: 'POST', body: 'b', signal: controller.signal }));
      const reader = response.body.getReader();
      await reader.read();
      for (let i = 0; i < 5; i++) { gc(); await new Promise((r) => setTimeout(r, 20)); }
      controller.abort(new Error('user left'));
      outcomes.push(await Promise.race([
        (async () => { for (;;) if ((await reader.read()).done) return 'ended'; })().catch((e) => 'rejected: ' + e.message),
        new Promise((r) => setTimeout(() => r('still reading'), 2000).unref()),
      ]));
      reader.cancel().catch(() => {});
    }
    console.log(JSON.stringify(outcomes));
    server.closeAllConnections();
    server.close();
  `;

  it('rejects the read with the abort reason, for a signal in init and on a Request', () => {
    const cwd = fileURLToPath(new URL('..', import.meta.url));
    const run = spawnSync(process.execPath, ['--expose-gc', '--input-type=module', '-e', script], { cwd, encoding: 'utf8', timeout: 30_000 });
    expect(run.stderr).toBe('');
    // Before: ["still reading","still reading"].
    expect(JSON.parse(run.stdout)).toEqual(['rejected: user left', 'rejected: user left']);
  });
});

describe('failures before the request was sent, and after', () => {
  let certificates: TestCertificates | undefined;
  const certs = (): TestCertificates => (certificates ??= makeCertificates());
  // Only a request that cannot follow a redirect can be known never sent (see the 303 tests below).
  const unredirected = (): RequestInit => ({ ...json({}), redirect: 'error' });

  async function tlsServer(key: string, cert: string) {
    const s = await startTlsServer(key, cert);
    open.push(s);
    return s;
  }

  // Was: retried until maxAttempts (or the deadline: with maxAttempts 50, every attempt a new
  // handshake the server refused to finish), then a RetryExhaustedError whose doc says the
  // request may have run, though none had reached the server.
  it.each([
    ['a self-signed certificate', 'DEPTH_ZERO_SELF_SIGNED_CERT', (c: TestCertificates): [string, string] => [c.selfSigned.key, c.selfSigned.cert]],
    ['an expired certificate', 'CERT_HAS_EXPIRED', (c: TestCertificates): [string, string] => [c.expired.key, c.expired.cert]],
    ['a certificate signed by an unknown CA', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', (c: TestCertificates): [string, string] => [c.leaf.key, c.leaf.cert]],
    ['a certificate signed by an unknown CA sent along', 'SELF_SIGNED_CERT_IN_CHAIN', (c: TestCertificates): [string, string] => [c.leaf.key, c.leaf.cert + c.ca]],
  ] as const)('%s is not retried: one connection, no request, RequestNotSentError says it was never sent', async (_, code, pick) => {
    const [key, cert] = pick(certs());
    const s = await tlsServer(key, cert);
    const { attempts, onAttempt } = recorder();
    const started = Date.now();
    const failed = await createIdempotentFetch({ baseDelayMs: 200, maxDelayMs: 200, maxAttempts: 50, deadlineMs: 10_000, onAttempt, random: () => 1 })(`${s.url}/orders`, unredirected()).catch((e: unknown) => e);
    // One attempt, no wait: the old code took at least 49 waits of 200 ms.
    expect(Date.now() - started).toBeLessThan(2_000);
    expect(s.connections()).toBe(1);
    expect(s.requests()).toBe(0);
    expect(failed).toBeInstanceOf(RequestNotSentError);
    expect(failed).toBeInstanceOf(RetryExhaustedError);
    expect(failed).toMatchObject({ name: 'RequestNotSentError', attempts: 1, key: attempts[0]!.key, cause: { cause: { code } } });
    expect((failed as Error).message).toContain('never sent');
    expect((failed as Error).message).toContain(code);
    expect((failed as Error).message).not.toContain('may have run');
    expect(attempts.map((a) => a.willRetry)).toEqual([false]);
  });

  it("another host's certificate (ERR_TLS_CERT_ALTNAME_INVALID, through node-fetch trusting the CA) is not retried either", async () => {
    const { otherHost, ca } = certs();
    const s = await tlsServer(otherHost.key, otherHost.cert);
    const agent = new HttpsAgent({ ca });
    const trusting = ((url: string, init: object) => nodeFetch(url, { ...init, agent })) as unknown as typeof fetch;
    const failed = await createIdempotentFetch({ ...fast, maxAttempts: 5, fetch: trusting })(`${s.url}/orders`, unredirected()).catch((e: unknown) => e);
    agent.destroy();
    expect(s.connections()).toBe(1);
    expect(s.requests()).toBe(0);
    expect(failed).toBeInstanceOf(RequestNotSentError);
    expect(failed).toMatchObject({ attempts: 1, cause: { name: 'FetchError', code: 'ERR_TLS_CERT_ALTNAME_INVALID' } });
    expect((failed as Error).message).toContain('never sent');
  });

  it('a trusted certificate still works: the same server, its CA trusted, answers', async () => {
    const { leaf, ca } = certs();
    const s = await tlsServer(leaf.key, leaf.cert);
    const agent = new HttpsAgent({ ca });
    const trusting = ((url: string, init: object) => nodeFetch(url, { ...init, agent })) as unknown as typeof fetch;
    const res = await createIdempotentFetch({ ...fast, fetch: trusting })(`${s.url}/orders`, json({}));
    agent.destroy();
    expect(res.status).toBe(201);
    expect(s.requests()).toBe(1);
  });

  // Was: RetryExhaustedError "No response to the last of 3 attempt(s)", whose doc says the
  // operation may have run: the caller could not tell a down server from a lost answer.
  it('a DNS failure is retried, then reported as never sent', async () => {
    const { attempts, onAttempt } = recorder();
    // .invalid never resolves (RFC 6761); a machine without DNS says EAI_AGAIN instead of ENOTFOUND.
    const failed = await createIdempotentFetch({ ...fast, maxAttempts: 3, onAttempt })('http://idemkit-client-test.invalid/orders', unredirected()).catch((e: unknown) => e);
    expect(attempts.map((a) => a.willRetry)).toEqual([true, true, false]);
    expect(failed).toBeInstanceOf(RequestNotSentError);
    expect((failed as RequestNotSentError).attempts).toBe(3);
    expect((failed as RequestNotSentError).cause).toMatchObject({ cause: { code: expect.stringMatching(/^(ENOTFOUND|EAI_AGAIN)$/) } });
    expect((failed as Error).message).toMatch(/never sent \(3 attempt\(s\)\)/);
  });

  it('a refused connection is retried, then reported as never sent (fetch and node-fetch)', async () => {
    const s = await server();
    const url = s.url;
    await s.close();
    for (const fetchImpl of [undefined, nodeFetch as unknown as typeof fetch]) {
      const failed = await createIdempotentFetch({ ...fast, maxAttempts: 2, fetch: fetchImpl })(`${url}/orders`, unredirected()).catch((e: unknown) => e);
      expect(failed).toBeInstanceOf(RequestNotSentError);
      expect(failed).toMatchObject({ attempts: 2 });
      expect((failed as Error).message).toMatch(/never sent .*ECONNREFUSED/);
      // Following redirects (the default), the refused connection may be a later hop's: may have run.
      const followed = await createIdempotentFetch({ ...fast, maxAttempts: 2, fetch: fetchImpl })(`${url}/orders`, json({})).catch((e: unknown) => e);
      expect(followed).toBeInstanceOf(RetryExhaustedError);
      expect(followed).not.toBeInstanceOf(RequestNotSentError);
      expect((followed as Error).message).toContain('may have run');
    }
  });

  it('a connection reset after the request was written still says the operation may have run, even when later attempts are refused', async () => {
    const { createServer } = await import('node:http');
    let requests = 0;
    const resetting = createServer((req) => {
      requests++;
      // The request arrived whole; the answer is lost, and the server goes away.
      req.socket.resetAndDestroy();
      resetting.close();
    });
    await new Promise<void>((resolve) => resetting.listen(0, '127.0.0.1', resolve));
    const url = `http://127.0.0.1:${(resetting.address() as { port: number }).port}/orders`;
    const { attempts, onAttempt } = recorder();
    // redirect: 'error', as a request must be to be called never sent at all: under 'follow' every
    // failure is "may have run" whatever the attempts met, and this test would check nothing.
    const failed = await createIdempotentFetch({ ...fast, maxAttempts: 3, onAttempt })(url, unredirected()).catch((e: unknown) => e);
    expect(requests).toBe(1);
    expect(attempts.map((a) => ((a.error as Error).cause as { code?: string }).code)).toEqual(['ECONNRESET', 'ECONNREFUSED', 'ECONNREFUSED']);
    expect(failed).toBeInstanceOf(RetryExhaustedError);
    expect(failed).not.toBeInstanceOf(RequestNotSentError);
    expect((failed as Error).message).toContain('may have run');
    expect((failed as Error).message).not.toContain('never sent');
  });

  it('every answer lost after the request reached the server: may have run, not "never sent"', async () => {
    const s = await server();
    const proxy = await startLossyProxy(s.url, 100);
    open.push(proxy);
    const failed = await createIdempotentFetch({ ...fast, maxAttempts: 2 })(`${proxy.url}/orders`, { ...json({ item: 'book' }), redirect: 'error' }).catch((error: unknown) => error);
    expect(failed).toBeInstanceOf(RetryExhaustedError);
    expect(failed).not.toBeInstanceOf(RequestNotSentError);
    expect((failed as Error).message).toContain('may have run');
    expect(s.runs.get('orders')).toBe(1);
  });

  it('an answer (a 503, which a gateway gives after the upstream ran) then refused connections: may have run, not "never sent"', async () => {
    const { createServer } = await import('node:http');
    let requests = 0;
    const closing = createServer((req, res) => {
      requests++;
      req.resume();
      // Answers 503 and goes away: every later attempt is refused.
      closing.close();
      res.writeHead(503, { connection: 'close' }).end();
    });
    await new Promise<void>((resolve) => closing.listen(0, '127.0.0.1', resolve));
    const url = `http://127.0.0.1:${(closing.address() as { port: number }).port}/orders`;
    const { attempts, onAttempt } = recorder();
    const failed = await createIdempotentFetch({ ...fast, maxAttempts: 3, onAttempt })(url, unredirected()).catch((e: unknown) => e);
    expect(requests).toBe(1);
    expect(attempts.map((a) => a.status ?? ((a.error as Error).cause as { code?: string }).code)).toEqual([503, 'ECONNREFUSED', 'ECONNREFUSED']);
    expect(failed).toBeInstanceOf(RetryExhaustedError);
    expect(failed).not.toBeInstanceOf(RequestNotSentError);
    expect((failed as Error).message).toContain('may have run');
  });
});

describe('the request body held for retries is bounded', () => {
  /** A stream of `total` bytes in 1 MiB chunks, each given at once; records its cancellation. */
  function stream(total: number) {
    let sent = 0;
    let cancelled = false;
    const body = new ReadableStream<Uint8Array>({
      pull(controller) {
        const size = Math.min(1 << 20, total - sent);
        if (size === 0) return controller.close();
        sent += size;
        controller.enqueue(new Uint8Array(size));
      },
      cancel() {
        cancelled = true;
      },
    });
    return { body, cancelled: () => cancelled };
  }

  // Was: read whole into memory, however long: an endless stream that yields at once never let
  // the deadline's timer run, and filled the machine's memory (23 GB in 11 minutes here).
  it('a body over the default 16 MiB (here 32 MiB) rejects with a TypeError before anything is sent, and the stream is cancelled', async () => {
    const s = await server();
    const { body, cancelled } = stream(32 * 1024 * 1024);
    const { attempts, onAttempt } = recorder();
    const error = await createIdempotentFetch({ ...fast, onAttempt })(`${s.url}/orders`, { method: 'POST', body, duplex: 'half' } as RequestInit).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(TypeError);
    expect((error as Error).message).toMatch(/over maxBodyBytes \(16777216 bytes\).*nothing was sent/);
    await vi.waitFor(() => expect(cancelled()).toBe(true));
    expect(s.requests).toBe(0);
    expect(attempts).toEqual([]);
  });

  it('maxBodyBytes sets the limit, counting a string chunk as its UTF-8 bytes; a body at the limit is sent', async () => {
    const s = await server();
    const fetchSafe = createIdempotentFetch({ ...fast, maxBodyBytes: 10 });
    const ok = await fetchSafe(`${s.url}/orders`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"a":"12"}' });
    expect(ok.status).toBe(201);
    await expect(fetchSafe(`${s.url}/orders`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"a":"123"}' })).rejects.toThrow(/over maxBodyBytes \(10 bytes\)/);
    // 9 characters, 11 bytes as UTF-8.
    const text = new ReadableStream({ start: (c) => (c.enqueue('"ééxyzab"' as unknown as Uint8Array), c.close()) });
    await expect(fetchSafe(`${s.url}/orders`, { method: 'POST', body: text, duplex: 'half' } as RequestInit)).rejects.toThrow(/over maxBodyBytes/);
    expect(s.requests).toBe(1);
    expect(() => createIdempotentFetch({ maxBodyBytes: -1 })).toThrow(TypeError);
    const unlimited = stream(17 * 1024 * 1024);
    const big = await createIdempotentFetch({ ...fast, maxBodyBytes: Infinity })(`${s.url}/orders`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: unlimited.body, duplex: 'half' } as RequestInit);
    // Sent whole: the server's own 1 MiB body limit answers.
    expect(big.status).toBe(413);
  });
});

describe('"never sent" is never said of a request that reached the server (a redirect followed after it ran)', () => {
  /** A payment endpoint that charges, then answers 303 See Other (POST/redirect/GET) to `location(port)`. */
  async function chargingServer(location: (ownPort: number) => string, closeAfter: boolean) {
    const { createServer } = await import('node:http');
    let charges = 0;
    const s = createServer((req, res) => {
      if (req.method !== 'POST') return void res.writeHead(404).end();
      req.resume();
      req.on('end', () => {
        charges++;
        // A server shutting down (a rolling deploy): it answers the request in flight, closes the
        // connection and stops listening, so the followed GET finds nobody.
        if (closeAfter) s.close();
        res.writeHead(303, { location: location(port), connection: closeAfter ? 'close' : 'keep-alive' }).end();
      });
    });
    await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
    const { port } = s.address() as { port: number };
    open.push({ close: () => new Promise<void>((resolve) => { s.closeAllConnections(); if (s.listening) s.close(() => resolve()); else resolve(); }) });
    return { url: `http://127.0.0.1:${port}`, charges: () => charges };
  }

  async function deadPort(): Promise<number> {
    const { createServer } = await import('node:net');
    const probe = createServer();
    await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
    const { port } = probe.address() as { port: number };
    await new Promise<void>((resolve) => probe.close(() => resolve()));
    return port;
  }

  // Was: RequestNotSentError ("never sent … sending it again, with any key, runs it once"), though
  // the card was charged: a caller that believed it and sent again with a new key charged twice.
  it.each([
    ['to another host that refuses the connection', false],
    ['to the same server, which stopped listening after answering (a deploy)', true],
  ] as const)('a 303 after the charge, followed %s: RetryExhaustedError (may have run), never RequestNotSentError', async (_, sameHost) => {
    const dead = sameHost ? 0 : await deadPort();
    const s = await chargingServer((own) => `http://127.0.0.1:${sameHost ? own : dead}/receipts/1`, sameHost);
    const { attempts, onAttempt } = recorder();
    const failed = await createIdempotentFetch({ ...fast, maxAttempts: 1, onAttempt })(`${s.url}/charges`, json({ cents: 500 })).catch((e: unknown) => e);
    expect(s.charges()).toBe(1);
    expect(attempts).toHaveLength(1);
    expect(((attempts[0]!.error as Error).cause as { code?: string }).code).toBe('ECONNREFUSED');
    expect(failed).toBeInstanceOf(RetryExhaustedError);
    expect(failed).not.toBeInstanceOf(RequestNotSentError);
    expect((failed as Error).message).toContain('may have run');
    expect((failed as Error).message).not.toContain('never sent');
  });
});
