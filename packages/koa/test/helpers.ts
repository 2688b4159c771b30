import { expect, vi } from 'vitest';
import { once } from 'node:events';
import { connect, type Socket } from 'node:net';
import { bodyParser } from '@koa/bodyparser';
import Koa from 'koa';
import { listen } from './app.js';
import type { TestAppHandle } from '@idemkit/http-suite';

/** What a response looked like on the wire, with the headers a replay may legitimately change removed. */
export interface Snapshot {
  readonly status: number;
  readonly headers: ReadonlyArray<readonly [string, string]>;
  readonly body: Buffer;
  readonly replayed: boolean;
}

const VOLATILE = new Set(['date', 'connection', 'keep-alive', 'idempotent-replayed']);

export async function snapshot(res: Response): Promise<Snapshot> {
  const headers = [...res.headers].filter(([name]) => !VOLATILE.has(name)).sort(([a], [b]) => a.localeCompare(b));
  return {
    status: res.status,
    headers,
    body: Buffer.from(await res.arrayBuffer()),
    replayed: res.headers.get('idempotent-replayed') === 'true',
  };
}

/** A Koa app with the usual parsers, `setup` adding the rest, listening on 127.0.0.1:0. */
export async function startKoa(
  setup: (app: Koa) => void,
  { parser = true, KoaClass = Koa }: { parser?: boolean; KoaClass?: typeof Koa } = {},
): Promise<TestAppHandle & { app: Koa }> {
  const app = new KoaClass();
  app.silent = true;
  if (parser) app.use(bodyParser({ enableTypes: ['json', 'form', 'text'] }));
  setup(app);
  return { ...(await listen(app)), app };
}

export function post(url: string, key: string | undefined, body: unknown = { a: 1 }, headers: Record<string, string> = {}, signal?: AbortSignal): Promise<Response> {
  return fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(key === undefined ? {} : { 'idempotency-key': key }), ...headers },
    body: JSON.stringify(body),
    signal,
  });
}

/** POST with `key` again until the answer has `status` (the key settled a lease later), within `timeout`: that answer. */
export function postUntil(status: number, url: string, key: string, body?: unknown, timeout = 5_000): Promise<Response> {
  return vi.waitFor(
    async () => {
      const reply = await post(url, key, body);
      expect(reply.status).toBe(status);
      return reply;
    },
    { timeout, interval: 100 },
  );
}

/** POST with `key` and leave once `running()` holds (the handler is at work): the request fails on the client. */
export async function leaveWhileRunning(url: string, key: string, running: () => boolean, body: unknown = {}): Promise<void> {
  const abort = new AbortController();
  const aborted = post(url, key, body, {}, abort.signal).catch(() => 'aborted');
  await vi.waitFor(() => expect(running()).toBe(true), { timeout: 10_000 });
  abort.abort();
  expect(await aborted).toBe('aborted');
}

/** A socket on which a JSON POST to `path` with `key` is pipelined behind `GET /slow` (it has no response socket of its own yet). */
export async function pipelinedBehindSlow(url: string, path: string, key: string): Promise<Socket> {
  const socket = connect(Number(new URL(url).port), '127.0.0.1');
  socket.on('error', () => undefined);
  await once(socket, 'connect');
  const body = '{"a":1}';
  socket.write(
    'GET /slow HTTP/1.1\r\nHost: x\r\n\r\n' +
      `POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nIdempotency-Key: ${key}\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
  );
  return socket;
}
