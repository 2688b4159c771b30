import { createMemoryStore } from '@idemkit/core';
import type Koa from 'koa';
import { afterEach, describe, expect, it } from 'vitest';
import { idempotency } from '../src/index.js';
import { post, snapshot, startKoa, type Snapshot } from './helpers.js';

const closers: Array<() => Promise<void>> = [];
afterEach(async () => {
  await Promise.all(closers.splice(0).map((close) => close()));
});

async function start(...args: Parameters<typeof startKoa>): ReturnType<typeof startKoa> {
  const handle = await startKoa(...args);
  closers.push(handle.close);
  return handle;
}

/** Handlers whose bytes on the wire must be the same with and without the middleware. */
const CASES: Record<string, Koa.Middleware> = {
  'object → JSON': (ctx) => { ctx.body = { b: [1, 2], s: 'é', n: null }; },
  'array → JSON': (ctx) => { ctx.body = [1, 'x', null]; },
  'number → JSON': (ctx) => { ctx.body = 42; },
  'false → JSON': (ctx) => { ctx.body = false; },
  'Uint8Array (not a Buffer) → JSON like Koa': (ctx) => { ctx.body = new Uint8Array([1, 2]); },
  'vendor JSON type kept': (ctx) => { ctx.type = 'application/vnd.api+json'; ctx.body = { a: 1 }; },
  'JSON type with null body → "null"': (ctx) => { ctx.type = 'json'; ctx.body = null; },
  'string → text/plain': (ctx) => { ctx.body = 'hello é'; },
  'string starting with < → text/html': (ctx) => { ctx.body = '<p>hi</p>'; },
  'string, type set afterwards': (ctx) => { ctx.body = '<a/>'; ctx.type = 'application/xml'; },
  'Buffer → octet-stream': (ctx) => { ctx.body = Buffer.from([0, 1, 255]); },
  'Buffer with content-type removed': (ctx) => { ctx.body = Buffer.from('raw'); ctx.remove('Content-Type'); },
  'string with content-type removed': (ctx) => { ctx.body = 'raw'; ctx.remove('Content-Type'); },
  'ctx.body = null → 204': (ctx) => { ctx.body = null; },
  'ctx.body = null, then status 200 → empty 200': (ctx) => { ctx.body = null; ctx.status = 200; },
  'status only → status text': (ctx) => { ctx.status = 201; },
  'status with custom message → message as body': (ctx) => { ctx.status = 202; ctx.message = 'Queued'; },
  'nothing set → Koa 404 "Not Found"': () => undefined,
  'explicit 204 with a body → stripped': (ctx) => { ctx.body = { a: 1 }; ctx.status = 204; },
  '304 with headers': (ctx) => { ctx.set('ETag', '"x"'); ctx.status = 304; },
  'repeated and appended headers': (ctx) => {
    ctx.set('Set-Cookie', ['a=1', 'b=2']);
    ctx.append('Link', '</a>; rel="a"');
    ctx.append('Link', '</b>; rel="b"');
    ctx.set('X-Number', '7');
    ctx.status = 201;
    ctx.body = { ok: true };
  },
};

/**
 * HEAD answers (with HEAD among `methods`): Koa sends no body and adds only the Content-Length of
 * a body when none is set. Before, the middleware turned a HEAD's unset body into the status text
 * and a body into a Buffer, so its Content-Length (and, with no body, its Content-Type) became
 * those of bytes never sent: `ctx.length = 1234` went out as `Content-Length: 2`, text/plain.
 */
const HEAD_CASES: Record<string, Koa.Middleware> = {
  'HEAD, length and type set, no body': (ctx) => { ctx.status = 200; ctx.type = 'application/pdf'; ctx.length = 1234; },
  'HEAD, status only': (ctx) => { ctx.status = 200; },
  'HEAD, string body with a length of its own': (ctx) => { ctx.body = 'abc'; ctx.set('Content-Length', '10'); },
  'HEAD, object body': (ctx) => { ctx.status = 201; ctx.body = { a: 1 }; },
  'HEAD, empty string body': (ctx) => { ctx.body = ''; },
};

/**
 * Runs every case on two apps of the same Koa, one plain and one with the middleware, and demands
 * identical status, headers and bytes for the first answer and for the replay.
 */
export function twinSuite(label: string, KoaClass: typeof Koa): void {
describe(`${label}: replays are byte-for-byte what Koa sends`, () => {
  it.each(Object.keys(CASES))('%s', async (name) => {
    const handler = CASES[name]!;
    let runs = 0;
    const counted: Koa.Middleware = async (ctx, next) => {
      runs++;
      await handler(ctx, next);
    };
    const plain = await start((app) => app.use(handler), { KoaClass });
    const guarded = await start((app) => {
      app.use(idempotency({ store: createMemoryStore() }));
      app.use(counted);
    }, { KoaClass });

    const expected = await snapshot(await post(plain.url, undefined));
    const first = await snapshot(await post(guarded.url, 'k-1'));
    const replay = await snapshot(await post(guarded.url, 'k-1'));

    expect(first).toEqual({ ...expected, replayed: false });
    // A 404 with no route (these apps have none: Koa's own, or Koa 3's for a JSON null body) is
    // not stored (see "an answer no route gave"): the retry runs again and is no replay.
    if (expected.status === 404) {
      expect(replay).toEqual({ ...expected, replayed: false });
      expect(runs).toBe(2);
      return;
    }
    expect(replay).toEqual({ ...withLength(expected), replayed: true });
    expect(runs).toBe(1);
  });

  it.each(Object.keys(HEAD_CASES))('%s', async (name) => {
    const handler = HEAD_CASES[name]!;
    let runs = 0;
    const plain = await start((app) => app.use(handler), { KoaClass });
    const guarded = await start((app) => {
      app.use(idempotency({ store: createMemoryStore(), methods: ['POST', 'HEAD'] }));
      app.use(async (ctx, next) => {
        runs++;
        await handler(ctx, next);
      });
    }, { KoaClass });
    const head = (url: string, key?: string): Promise<Response> => fetch(url, { method: 'HEAD', headers: key === undefined ? {} : { 'idempotency-key': key } });

    const expected = await snapshot(await head(plain.url));
    expect(await snapshot(await head(guarded.url, 'k-head'))).toEqual({ ...expected, replayed: false });
    expect(await snapshot(await head(guarded.url, 'k-head'))).toEqual({ ...expected, replayed: true });
    expect(runs).toBe(1);
  });
});
}

/**
 * A replay always carries the stored body's Content-Length (SPEC §2: recomputed), also where
 * plain Koa 2 sent an empty body without one; Koa itself strips it again on 204/205/304.
 */
function withLength(s: Snapshot): Snapshot {
  if ([204, 205, 304].includes(s.status) || s.headers.some(([name]) => name === 'content-length')) return s;
  const headers = [...s.headers, ['content-length', String(s.body.length)] as const].sort(([a], [b]) => a.localeCompare(b));
  return { ...s, headers };
}
