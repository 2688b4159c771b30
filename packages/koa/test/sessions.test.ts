import Router from '@koa/router';
import { createMemoryStore } from '@idemkit/core';
import Koa from 'koa';
import Koa215 from 'koa-2.15';
import Koa216 from 'koa-2.16';
import session from 'koa-session';
import { afterEach, describe, expect, it } from 'vitest';
import { idempotency, type KoaIdempotencyOptions } from '../src/index.js';
import { post, startKoa } from './helpers.js';

/**
 * koa-session, the real package: a login sets `ctx.session.user`, and koa-session writes the
 * cookie when its middleware's `await next()` returns. Where it is mounted decides whether that
 * cookie is part of the answer idempotency() stores (see the README, "Session middleware").
 */

const closers: Array<() => Promise<void>> = [];
afterEach(async () => {
  while (closers.length > 0) await closers.pop()!();
});

interface Counts {
  logins: number;
  renames: number;
}

function routes(counts: Counts): Router {
  const router = new Router();
  router.post('/login', (ctx) => {
    counts.logins += 1;
    const { user } = ctx.request.body as { user: string };
    ctx.session!.user = user;
    ctx.status = 201;
    ctx.body = { user };
  });
  // Commits the session itself, before the answer is stored (koa-session's own commit comes later).
  router.post('/login-commit', async (ctx) => {
    counts.logins += 1;
    const { user } = ctx.request.body as { user: string };
    ctx.session!.user = user;
    await ctx.session!.manuallyCommit();
    ctx.status = 201;
    ctx.body = { user };
  });
  router.post('/rename', (ctx) => {
    counts.renames += 1;
    const { name } = ctx.request.body as { name: string };
    ctx.session!.name = name;
    ctx.body = { user: ctx.session!.user, name };
  });
  router.get('/me', (ctx) => {
    ctx.body = { user: ctx.session?.user ?? null, name: ctx.session?.name ?? null };
  });
  router.get('/visit', (ctx) => {
    ctx.session!.visits = Number(ctx.session!.visits ?? 0) + 1;
    ctx.body = { visits: ctx.session!.visits };
  });
  return router;
}

type Order = 'idempotency-first' | 'session-first';

/** A koa-session external store in this process, counting its writes. */
function externalStore(): { sets: number; get: (key: string) => Promise<unknown>; set: (key: string, value: unknown) => Promise<void>; destroy: (key: string) => Promise<void> } {
  const sessions = new Map<string, unknown>();
  const store = {
    sets: 0,
    get: async (key: string) => sessions.get(key),
    set: async (key: string, value: unknown) => {
      store.sets += 1;
      sessions.set(key, value);
    },
    destroy: async (key: string) => {
      sessions.delete(key);
    },
  };
  return store;
}

async function start(
  KoaClass: typeof Koa,
  order: Order,
  extra: Partial<KoaIdempotencyOptions> = {},
  sessionOptions: Parameters<typeof session>[1] = {},
): Promise<{ url: string; counts: Counts }> {
  const counts: Counts = { logins: 0, renames: 0 };
  const router = routes(counts);
  const { url, close } = await startKoa((app: Koa) => {
    app.keys = ['koas-test-key'];
    const idem = idempotency({ store: createMemoryStore(), ...extra });
    const sess = session(app, sessionOptions);
    if (order === 'idempotency-first') app.use(idem).use(sess);
    else app.use(sess).use(idem);
    app.use(router.routes());
  }, { KoaClass });
  closers.push(close);
  return { url, counts };
}

/** `name=value` of each Set-Cookie of a response. */
function cookiesOf(res: Response): string[] {
  return res.headers.getSetCookie().map((line) => line.slice(0, line.indexOf(';') === -1 ? undefined : line.indexOf(';')));
}

function names(res: Response): string[] {
  return cookiesOf(res).map((pair) => pair.slice(0, pair.indexOf('=')));
}

/** The Cookie header a browser would send after these responses (later cookies win). */
function jar(...responses: Response[]): string {
  const cookies = new Map<string, string>();
  for (const res of responses) for (const pair of cookiesOf(res)) cookies.set(pair.slice(0, pair.indexOf('=')), pair);
  return [...cookies.values()].join('; ');
}

async function me(url: string, cookie: string): Promise<unknown> {
  const res = await fetch(`${url}/me`, { headers: cookie === '' ? {} : { cookie } });
  return res.json();
}

// Koa 3, the lowest Koa of the peer range and the last Koa 2 line.
const VERSIONS: ReadonlyArray<readonly [string, typeof Koa]> = [
  ['koa 3', Koa],
  ['koa 2.15', Koa215 as unknown as typeof Koa],
  ['koa 2.16', Koa216 as unknown as typeof Koa],
];

for (const [label, KoaClass] of VERSIONS) {
  describe(`koa binding (${label}): koa-session mounted after idempotency() (the documented order)`, () => {
    it('a retried login whose first answer was lost is replayed with its session cookie: the client is logged in, the login ran once', async () => {
      const { url, counts } = await start(KoaClass, 'idempotency-first');
      const lost = await post(`${url}/login`, 'login-1', { user: 'alice' });
      expect(lost.status).toBe(201);
      expect(names(lost).sort()).toEqual(['koa.sess', 'koa.sess.sig']);
      // The client never saw that answer: it retries with the same key and no cookie.
      const retry = await post(`${url}/login`, 'login-1', { user: 'alice' });
      expect(retry.status).toBe(201);
      expect(retry.headers.get('idempotent-replayed')).toBe('true');
      expect(counts.logins).toBe(1);
      expect(cookiesOf(retry)).toEqual(cookiesOf(lost));
      expect(await me(url, jar(retry))).toEqual({ user: 'alice', name: null });
    });

    it('a retry that carries a session cookie of its own gets each cookie once, the login\'s', async () => {
      const { url, counts } = await start(KoaClass, 'idempotency-first', {}, { rolling: true });
      const visit = await fetch(`${url}/visit`);
      const anonymous = jar(visit);
      expect(names(visit).sort()).toEqual(['koa.sess', 'koa.sess.sig']);
      const lost = await post(`${url}/login`, 'login-2', { user: 'alice' }, { cookie: anonymous });
      const retry = await post(`${url}/login`, 'login-2', { user: 'alice' }, { cookie: anonymous });
      expect(retry.headers.get('idempotent-replayed')).toBe('true');
      expect(counts.logins).toBe(1);
      expect(names(retry).sort()).toEqual(['koa.sess', 'koa.sess.sig']);
      expect(cookiesOf(retry)).toEqual(cookiesOf(lost));
      expect(await me(url, jar(visit, retry))).toMatchObject({ user: 'alice' });
    });

    it("with a scope that reads the session, a replay never carries another user's session cookie", async () => {
      // koa-session decodes a cookie session lazily, so `ctx.session` is readable before its middleware runs.
      const { url, counts } = await start(KoaClass, 'idempotency-first', { scope: (ctx) => (ctx.session?.user as string | undefined) ?? undefined });
      const alice = jar(await post(`${url}/login`, 'login-a', { user: 'alice' }));
      const bob = jar(await post(`${url}/login`, 'login-b', { user: 'bob' }));
      const aliceRenamed = await post(`${url}/rename`, 'rename-1', { name: 'Al' }, { cookie: alice });
      expect(aliceRenamed.status).toBe(200);
      // Bob, the same key and body: his own run, his own session, none of Alice's cookies.
      const bobRenamed = await post(`${url}/rename`, 'rename-1', { name: 'Al' }, { cookie: bob });
      expect(bobRenamed.headers.get('idempotent-replayed')).toBeNull();
      expect(counts.renames).toBe(2);
      expect(await bobRenamed.json()).toEqual({ user: 'bob', name: 'Al' });
      expect(cookiesOf(bobRenamed).some((pair) => cookiesOf(aliceRenamed).includes(pair))).toBe(false);
      expect(await me(url, jar(bobRenamed))).toEqual({ user: 'bob', name: 'Al' });
      // Alice's own retry is replayed with her cookie.
      const aliceRetry = await post(`${url}/rename`, 'rename-1', { name: 'Al' }, { cookie: alice });
      expect(aliceRetry.headers.get('idempotent-replayed')).toBe('true');
      expect(cookiesOf(aliceRetry)).toEqual(cookiesOf(aliceRenamed));
      expect(counts.renames).toBe(2);
    });
  });

  describe(`koa binding (${label}): koa-session mounted before idempotency() (a documented limitation)`, () => {
    it('the session cookie is written after the answer was stored: the replay of a retried login carries none, and the client is not logged in', async () => {
      const { url, counts } = await start(KoaClass, 'session-first');
      const lost = await post(`${url}/login`, 'login-3', { user: 'alice' });
      expect(names(lost).sort()).toEqual(['koa.sess', 'koa.sess.sig']);
      const retry = await post(`${url}/login`, 'login-3', { user: 'alice' });
      expect(retry.headers.get('idempotent-replayed')).toBe('true');
      expect(counts.logins).toBe(1);
      expect(cookiesOf(retry)).toEqual([]);
      expect(await me(url, jar(retry))).toEqual({ user: null, name: null });
    });
  });

  describe(`koa binding (${label}): koa-session mounted before idempotency(), the handler commits the session itself`, () => {
    it('the retried login is replayed with the cookie its own commit wrote: the client is logged in, the login ran once', async () => {
      const { url, counts } = await start(KoaClass, 'session-first');
      const lost = await post(`${url}/login-commit`, 'login-4', { user: 'alice' });
      expect(lost.status).toBe(201);
      // koa-session commits again when its middleware resumes: one cookie of each name goes out.
      expect(names(lost).sort()).toEqual(['koa.sess', 'koa.sess.sig']);
      const retry = await post(`${url}/login-commit`, 'login-4', { user: 'alice' });
      expect(retry.headers.get('idempotent-replayed')).toBe('true');
      expect(counts.logins).toBe(1);
      expect(names(retry).sort()).toEqual(['koa.sess', 'koa.sess.sig']);
      expect(await me(url, jar(retry))).toEqual({ user: 'alice', name: null });
    });

    it('with rolling: true and a scope that reads the session, a retry that carries a session cookie of its own gets that one instead (koa-session overwrites the replayed one)', async () => {
      const { url, counts } = await start(KoaClass, 'session-first', { scope: (ctx) => (ctx.session?.user as string | undefined) ?? undefined }, { rolling: true });
      const visit = await fetch(`${url}/visit`);
      const anonymous = jar(visit);
      await post(`${url}/login-commit`, 'login-5', { user: 'alice' }, { cookie: anonymous });
      const retry = await post(`${url}/login-commit`, 'login-5', { user: 'alice' }, { cookie: anonymous });
      expect(retry.headers.get('idempotent-replayed')).toBe('true');
      expect(counts.logins).toBe(1);
      expect(names(retry).sort()).toEqual(['koa.sess', 'koa.sess.sig']);
      expect(await me(url, jar(visit, retry))).toEqual({ user: null, name: null });
    });
  });

  describe(`koa binding (${label}): koa-session with an external store, mounted before idempotency(), the handler commits the session itself`, () => {
    it("the scope reads the loaded session: the retried login is replayed with its cookie, and another user's replay never carries it", async () => {
      const store = externalStore();
      const { url, counts } = await start(KoaClass, 'session-first', { scope: (ctx) => (ctx.session?.user as string | undefined) ?? undefined }, { store });
      const lost = await post(`${url}/login-commit`, 'login-6', { user: 'alice' });
      // The handler's commit and koa-session's own: two writes, one cookie of each name.
      expect(store.sets).toBe(2);
      expect(names(lost).sort()).toEqual(['koa.sess', 'koa.sess.sig']);
      const retry = await post(`${url}/login-commit`, 'login-6', { user: 'alice' });
      expect(retry.headers.get('idempotent-replayed')).toBe('true');
      expect(counts.logins).toBe(1);
      expect(cookiesOf(retry)).toEqual(cookiesOf(lost));
      const alice = jar(retry);
      expect(await me(url, alice)).toEqual({ user: 'alice', name: null });

      const bob = jar(await post(`${url}/login-commit`, 'login-7', { user: 'bob' }));
      const aliceRenamed = await post(`${url}/rename`, 'rename-2', { name: 'Al' }, { cookie: alice });
      const bobRenamed = await post(`${url}/rename`, 'rename-2', { name: 'Al' }, { cookie: bob });
      expect(bobRenamed.headers.get('idempotent-replayed')).toBeNull();
      expect(counts.renames).toBe(2);
      expect(await bobRenamed.json()).toEqual({ user: 'bob', name: 'Al' });
      expect(cookiesOf(bobRenamed).some((pair) => cookiesOf(aliceRenamed).includes(pair))).toBe(false);
      expect(await me(url, bob)).toEqual({ user: 'bob', name: 'Al' });
      expect(await me(url, alice)).toEqual({ user: 'alice', name: 'Al' });
    });
  });
}
