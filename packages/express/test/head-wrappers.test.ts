import { randomUUID } from 'node:crypto';
import { createMemoryStore } from '@idemkit/core';
import cookieSession from 'cookie-session';
import express, { type Express, type Response } from 'express';
import { describe, expect, it } from 'vitest';
import { idempotency } from '../src/index.js';
import { serving } from './app.js';

const serve = serving();

interface Answer {
  readonly h: Headers;
  readonly status: number;
  readonly statusText: string;
  readonly text: string;
}

async function post(url: string, key: string): Promise<Answer> {
  const res = await fetch(url, { method: 'POST', headers: { 'idempotency-key': key } });
  return { h: res.headers, status: res.status, statusText: res.statusText, text: await res.text() };
}

/** A writeHead wrapper on the app's response prototype (as an APM agent adds), appending one header per call. */
function timedPrototype(app: Express): void {
  const proto = app.response as unknown as { writeHead: Response['writeHead'] };
  const wrapped = proto.writeHead;
  proto.writeHead = function writeHead(this: Response, ...args: unknown[]) {
    this.appendHeader('server-timing', 'app;dur=1');
    return Reflect.apply(wrapped, this, args) as Response;
  } as Response['writeHead'];
}

describe('express binding: writeHead wrappers and the early run of the head listeners', () => {
  it('a writeHead wrapper set in the handler that passes headers and a reason to the head it wraps: the first answer has them, as without idempotency()', async () => {
    const build = (withIdempotency: boolean): Express => {
      const app = express();
      app.use(cookieSession({ name: 'sess', keys: ['k'] }));
      if (withIdempotency) app.use(idempotency({ store: createMemoryStore(), logger: false }));
      app.post('/x', (req, res) => {
        (req.session as unknown as Record<string, unknown>)['user'] = 'alice';
        const wrapped = res.writeHead;
        res.writeHead = function writeHead(this: Response, status: number) {
          return Reflect.apply(wrapped, this, [status, 'Made Here', { 'x-wrapped': '1' }]) as Response;
        } as Response['writeHead'];
        res.status(201).json({ ok: true });
      });
      return app;
    };
    const plain = await post(`${await serve(build(false))}/x`, randomUUID());
    const first = await post(`${await serve(build(true))}/x`, randomUUID());
    expect(plain.h.get('x-wrapped')).toBe('1');
    expect(plain.statusText).toBe('Made Here');
    expect(first.h.get('x-wrapped')).toBe('1');
    expect(first.statusText).toBe('Made Here');
  });

  it('a writeHead wrapper on the app\'s response prototype runs once for the first answer, as without idempotency()', async () => {
    const build = (withIdempotency: boolean): Express => {
      const app = express();
      timedPrototype(app);
      app.use(cookieSession({ name: 'sess', keys: ['k'] }));
      if (withIdempotency) app.use(idempotency({ store: createMemoryStore(), logger: false }));
      app.post('/x', (req, res) => {
        (req.session as unknown as Record<string, unknown>)['user'] = 'alice';
        res.status(201).json({ ok: true });
      });
      return app;
    };
    const plain = await post(`${await serve(build(false))}/x`, randomUUID());
    const url = await serve(build(true));
    const key = randomUUID();
    const first = await post(`${url}/x`, key);
    expect(plain.h.get('server-timing')).toBe('app;dur=1');
    expect(first.h.get('server-timing')).toBe('app;dur=1');
    // The replay (with stored cookies, so its head listeners run early too): once as well.
    const replay = await post(`${url}/x`, key);
    expect(replay.h.get('idempotent-replayed')).toBe('true');
    expect(replay.h.get('server-timing')).toBe('app;dur=1');
  });

  it('a writeHead wrapper on the response prototype, with no per-request one: once for the first answer and for its replay with stored cookies', async () => {
    const app = express();
    timedPrototype(app);
    app.use(idempotency({ store: createMemoryStore(), logger: false }));
    app.post('/x', (_req, res) => {
      res.cookie('a', '1');
      res.status(201).json({ ok: true });
    });
    const url = await serve(app);
    const key = randomUUID();
    const first = await post(`${url}/x`, key);
    const replay = await post(`${url}/x`, key);
    expect(first.h.get('server-timing')).toBe('app;dur=1');
    expect(replay.h.get('idempotent-replayed')).toBe('true');
    expect(replay.h.get('server-timing')).toBe('app;dur=1');
    expect(replay.h.getSetCookie()).toEqual(first.h.getSetCookie());
  });
});
