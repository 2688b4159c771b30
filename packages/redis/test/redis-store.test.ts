import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { LeaseToken, StoredResponse } from '@idemkit/core';
import { answerHoldingProxy, type ResolvedService } from '@idemkit/test-services';
import { Redis } from 'ioredis';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { createRedisStore, type RedisStore, type RedisStoreSettings } from '../src/index.js';
import { clientAddr, countSocketWrites, deleteByPrefix, ownRedisServer, redisClient, redisNow, redisService, retargetableHop, uniquePrefix } from './services.js';

let service: ResolvedService<string>;
let url: string;
let redis: Redis;
let redis2: Redis;
const prefix = uniquePrefix('redis_store');

beforeAll(async () => {
  service = await redisService();
  url = service.value;
  redis = await redisClient(url);
  redis2 = await redisClient(url);
});

afterAll(async () => {
  // Leave nothing behind on the shared server.
  await deleteByPrefix(redis, prefix);
  await redis?.quit();
  await redis2?.quit();
  await service?.stop();
});

afterEach(() => {
  vi.useRealTimers();
});

let n = 0;
const key = (label: string): string => `${label}:${++n}:${Date.now()}`;
const store = (extra: RedisStoreSettings = {}): RedisStore =>
  createRedisStore({ client: redis, prefix, ...extra });

const response = (body: Uint8Array, status = 201): StoredResponse => ({
  status,
  headers: [
    ['content-type', 'application/octet-stream'],
    ['set-cookie', 'a=1'],
    ['set-cookie', 'b=2'],
    ['x-unicode', 'grüße ✓'],
  ],
  body,
});

async function acquire(s: RedisStore, k: string, leaseMs = 60_000): Promise<LeaseToken> {
  const r = await s.begin(k, 'fp', leaseMs);
  if (r.kind !== 'acquired') throw new Error(`expected acquired, got ${r.kind}`);
  return r.token;
}

describe('races', () => {
  it('200 concurrent begins from two separate ioredis clients: exactly one winner', async () => {
    const a = createRedisStore({ client: redis, prefix });
    const b = createRedisStore({ client: redis2, prefix });
    const k = key('race');
    const results = await Promise.all(
      Array.from({ length: 200 }, (_, i) => (i % 2 === 0 ? a : b).begin(k, 'fp', 30_000)),
    );
    const winners = results.filter((r) => r.kind === 'acquired');
    expect(winners).toHaveLength(1);
    const losers = results.filter((r) => r.kind === 'existing');
    expect(losers).toHaveLength(199);
    for (const r of losers) {
      if (r.kind !== 'existing') continue;
      expect(r.record.state).toBe('in_progress');
      expect(r.leaseRemainingMs).toBeGreaterThan(0);
      expect(r.leaseRemainingMs).toBeLessThanOrEqual(30_000);
    }
  });
});

describe('one round trip per operation', () => {
  it.each(['set', 'script'] as const)("each operation is one command, seen by MONITOR (claim: '%s')", async (claim) => {
    const client = await redisClient(url);
    const addr = await clientAddr(client);
    // ioredis's monitor() opens a second connection from this one, which stays ours to close.
    const base = new Redis(url);
    const monitor = await base.monitor();
    // Once it is closing, ioredis reads the lines MONITOR still sends as replies to no command and
    // emits 'Command queue state error' (an uncaught exception without a listener). Only errors
    // before the teardown count.
    let closing = false;
    const monitorErrors: Error[] = [];
    monitor.on('error', (error: Error) => void (closing || monitorErrors.push(error)));
    const seen: string[][] = [];
    monitor.on('monitor', (_time: string, args: string[], source: string) => {
      if (source === addr) seen.push(args);
    });
    try {
      // MONITOR is live once it shows a marker sent after it started.
      const marker = async (text: string): Promise<void> => {
        await client.echo(text);
        await vi.waitFor(() => expect(seen.some((a) => a[0] === 'echo' && a[1] === text)).toBe(true), {
          timeout: 5_000,
          interval: 10,
        });
      };
      await marker('start');
      const s = createRedisStore({ client, prefix, claim });
      const k = key('rt');
      const k2 = key('rt2');
      const ops: Array<[string, () => Promise<unknown>]> = [];
      let token = '' as LeaseToken;
      let token2 = '' as LeaseToken;
      ops.push(['begin (new key)', async () => (token = await acquire(s, k))]);
      ops.push(['complete', () => s.complete(k, token, response(new Uint8Array([1, 2, 3])), 60_000)]);
      ops.push(['begin (replay)', () => s.begin(k, 'fp', 60_000)]);
      ops.push(['get', () => s.get(k)]);
      ops.push(['begin (second key)', async () => (token2 = await acquire(s, k2))]);
      ops.push(['begin (in flight)', () => s.begin(k2, 'fp', 60_000)]);
      ops.push(['renew', () => s.renew(k2, token2, 60_000)]);
      ops.push(['release', () => s.release(k2, token2)]);

      const perOp: Record<string, string[]> = {};
      for (const [name, op] of ops) {
        await marker(`before ${name}`);
        const from = seen.length;
        await op();
        await marker(`after ${name}`);
        // Everything between the two markers, minus the closing marker itself.
        perOp[name] = seen
          .slice(from, -1)
          .map((a) => `${a[0] === 'eval' ? 'evalsha' : a[0]} ${a[a[0] === 'eval' || a[0] === 'evalsha' ? 3 : 1]}`);
      }
      const script = (k_: string): string => `evalsha ${prefix}${k_}`;
      const begin = claim === 'set' ? (k_: string): string => `set ${prefix}${k_}` : script;
      // With claim 'set', begin is a plain SET … NX GET, and on a key whose request is still in
      // flight a script follows to read the lease by the Redis clock (the contended path only).
      expect(perOp).toEqual({
        'begin (new key)': [begin(k)],
        complete: [script(k)],
        'begin (replay)': [begin(k)],
        get: [script(k)],
        'begin (second key)': [begin(k2)],
        'begin (in flight)': claim === 'set' ? [begin(k2), script(k2)] : [script(k2)],
        renew: [script(k2)],
        release: [script(k2)],
      });

      // purgeExpired does not touch Redis at all.
      await marker('before purge');
      const from = seen.length;
      expect(await s.purgeExpired()).toBe(0);
      await marker('after purge');
      expect(seen.slice(from, -1)).toEqual([]);
      expect(monitorErrors).toEqual([]);
    } finally {
      closing = true;
      monitor.disconnect();
      base.disconnect();
      await client.quit();
    }
  });

  it('keeps working after SCRIPT FLUSH (ioredis falls back from EVALSHA to EVAL by itself)', async () => {
    const s = store();
    const k = key('flush');
    const token = await acquire(s, k);
    await redis.script('FLUSH');
    expect(await s.complete(k, token, response(new Uint8Array([9])), 60_000)).toBe(true);
    expect((await s.get(k))?.state).toBe('completed');
  });

  it.each(['set', 'script'] as const)(
    "every script keeps working after SCRIPT FLUSH and after a Redis restart, 20 calls in one socket write each (claim: '%s')",
    async (claim) => {
      // A restart (or a failover to a replica: scripts are replicated as their effects, so a
      // replica never caches them) leaves Redis without the scripts. ioredis sends EVAL on a new
      // connection and falls back from EVALSHA on NOSCRIPT; every operation must get there,
      // also when a whole batch meets NOSCRIPT at once.
      const own = await ownRedisServer();
      const client = new Redis(own.url, { retryStrategy: () => 50 });
      client.on('error', () => undefined);
      const s = createRedisStore({ client, prefix, claim });
      const flush = (): Promise<unknown> => own.client.script('FLUSH');
      try {
        const keys = Array.from({ length: 20 }, (_, i) => key(`noscript-${i}`));
        const claimAll = async (): Promise<LeaseToken[]> =>
          Promise.all(
            keys.map(async (k) => {
              const r = await s.begin(k, 'fp', 60_000);
              if (r.kind !== 'acquired') throw new Error(`expected acquired, got ${r.kind}`);
              return r.token;
            }),
          );
        const tokens = await claimAll();
        const all = <T>(f: (k: string, token: LeaseToken) => Promise<T>): Promise<T[]> => Promise.all(keys.map((k, i) => f(k, tokens[i] as LeaseToken)));
        await flush();
        expect(await all((k, t) => s.renew(k, t, 60_000))).toEqual(keys.map(() => true));
        await flush();
        expect((await all((k) => s.get(k))).map((r) => r?.state)).toEqual(keys.map(() => 'in_progress'));
        await flush();
        expect((await all((k) => s.begin(k, 'fp', 60_000))).map((r) => r.kind)).toEqual(keys.map(() => 'existing'));
        await flush();
        expect(await all((k, t) => s.release(k, t))).toEqual(keys.map(() => true));

        await own.restart();
        const again = await claimAll();
        await own.restart();
        // The claims died with the restart: refused (not thrown), then claimed afresh.
        expect(await Promise.all(keys.map((k, i) => s.complete(k, again[i] as LeaseToken, response(new Uint8Array([1])), 60_000)))).toEqual(keys.map(() => false));
        tokens.splice(0, tokens.length, ...(await claimAll()));
        expect(await all((k, t) => s.complete(k, t, response(new Uint8Array([2])), 60_000))).toEqual(keys.map(() => true));
        expect((await all((k) => s.get(k))).map((r) => r?.response?.body)).toEqual(keys.map(() => new Uint8Array([2])));
      } finally {
        client.disconnect();
        await own.stop();
      }
    },
    20_000,
  );
});

describe('one socket write per event-loop turn', () => {
  it('50 begins sent in one turn leave in one write; the client is uncorked after the turn', async () => {
    const client = await redisClient(url);
    const s = createRedisStore({ client, prefix });
    // Scripts known to Redis, so no EVALSHA → EVAL retry adds writes of its own.
    await acquire(s, key('warm'));
    const socket = client.stream;
    const counter = countSocketWrites(socket);
    try {
      const results = await Promise.all(Array.from({ length: 50 }, () => s.begin(key('batch'), 'fp', 60_000)));
      expect(results.map((r) => r.kind)).toEqual(Array.from({ length: 50 }, () => 'acquired'));
      expect(counter.writes()).toBe(1);
      // Nothing of yours stays held back: the socket is uncorked, and your commands go out alone.
      expect(socket.writableCorked).toBe(0);
      const before = counter.writes();
      expect(await client.ping()).toBe('PONG');
      expect(counter.writes()).toBe(before + 1);
    } finally {
      counter.restore();
      await client.quit();
    }
  });

  it("fake timers (vitest's defaults fake setImmediate) never leave the socket corked", async () => {
    // An app's tests often fake time around real Redis calls. The uncork is scheduled with the
    // real setImmediate, so commands still leave, and the client stays usable afterwards.
    const client = await redisClient(url);
    const s = createRedisStore({ client, prefix });
    vi.useFakeTimers();
    try {
      const k = key('fake-timers');
      const r = await s.begin(k, 'fp', 60_000);
      expect(r.kind).toBe('acquired');
      if (r.kind === 'acquired') expect(await s.complete(k, r.token, response(new Uint8Array([3])), 60_000)).toBe(true);
      expect(client.stream.writableCorked).toBe(0);
      expect(await client.ping()).toBe('PONG');
    } finally {
      vi.useRealTimers();
    }
    expect((await s.get(key('fake-timers-after')))).toBeUndefined();
    await client.quit();
  });

  it('works on a client with enableAutoPipelining (its own batching runs after the uncork)', async () => {
    const client = new Redis(url, { enableAutoPipelining: true });
    await client.ping();
    const s = createRedisStore({ client, prefix });
    try {
      const keys = Array.from({ length: 20 }, () => key('autopipe'));
      const begun = await Promise.all(keys.map((k) => s.begin(k, 'fp', 60_000)));
      const tokens = begun.map((r) => (r.kind === 'acquired' ? r.token : null));
      expect(tokens.every((t) => t !== null)).toBe(true);
      const done = await Promise.all(keys.map((k, i) => s.complete(k, tokens[i] as LeaseToken, response(new Uint8Array([i])), 60_000)));
      expect(done.every(Boolean)).toBe(true);
      const replays = await Promise.all(keys.map((k) => s.get(k)));
      expect(replays.map((r) => r?.response?.body[0])).toEqual(keys.map((_, i) => i));
      expect(client.stream.writableCorked).toBe(0);
    } finally {
      await client.quit();
    }
  });

  it('batches only while the client is ready: commands queued before connect still run', async () => {
    const client = new Redis(url, { lazyConnect: true });
    const s = createRedisStore({ client, prefix });
    const k = key('lazy');
    // Sent while ioredis is still connecting: held in its offline queue, nothing to cork.
    const pending = s.begin(k, 'fp', 60_000);
    expect(client.status).not.toBe('ready');
    const r = await pending;
    expect(r.kind).toBe('acquired');
    expect(client.stream.writableCorked).toBe(0);
    await client.quit();
  });
});

describe('bytes and keys', () => {
  it('round-trips a 1 MiB body holding every byte 0x00–0xFF exactly', async () => {
    const s = store();
    const body = new Uint8Array(1024 * 1024);
    for (let i = 0; i < body.length; i++) body[i] = (i * 7 + (i >> 8)) & 0xff;
    // Every byte value appears.
    expect(new Set(body).size).toBe(256);
    const k = key('bin');
    const token = await acquire(s, k);
    expect(await s.complete(k, token, response(body), 60_000)).toBe(true);

    const got = await s.get(k);
    expect(got?.response?.body).toBeInstanceOf(Uint8Array);
    expect(Buffer.from(got!.response!.body).equals(Buffer.from(body))).toBe(true);
    expect(got?.response?.headers).toEqual(response(body).headers);

    const replay = await s.begin(k, 'fp', 60_000);
    expect(replay.kind).toBe('existing');
    if (replay.kind === 'existing') {
      expect(Buffer.from(replay.record.response!.body).equals(Buffer.from(body))).toBe(true);
      expect(replay.leaseRemainingMs).toBe(0);
    }
  });

  it('round-trips an empty body and a body of a subarray view', async () => {
    const s = store();
    const k = key('empty');
    const t = await acquire(s, k);
    expect(await s.complete(k, t, response(new Uint8Array(0), 204), 60_000)).toBe(true);
    expect((await s.get(k))?.response?.body).toEqual(new Uint8Array(0));

    const backing = new Uint8Array([0xde, 0xad, 0xbe, 0xef, 0x00, 0xff]);
    const k2 = key('view');
    const t2 = await acquire(s, k2);
    expect(await s.complete(k2, t2, response(backing.subarray(2, 5)), 60_000)).toBe(true);
    expect(Array.from((await s.get(k2))!.response!.body)).toEqual([0xbe, 0xef, 0x00]);
  });

  it.each([
    ['Lua metacharacters', `a'b"c\\d]]--[[e%sf..g#h`],
    ['pattern metacharacters', 'user:*?[a-z]^$.+(x)|{tag}'],
    ['hash tags and braces', '{}{a}b}{'],
    ['unicode', 'ключ-🔑-鍵'],
    ['spaces and newlines', ' a b\r\n c '],
  ])('keeps keys with %s as data', async (_label, raw) => {
    const s = store();
    const k = `${raw}:${++n}`;
    const other = `${raw.slice(0, -1)}:${n}`;
    const token = await acquire(s, k);
    expect(await redis.exists(prefix + k)).toBe(1);
    // A key that a glob would match must be untouched.
    expect((await s.begin(other, 'fp', 60_000)).kind).toBe('acquired');
    expect(await s.complete(k, token, response(Buffer.from(raw)), 60_000)).toBe(true);
    const got = await s.get(k);
    expect(got?.key).toBe(k);
    expect(Buffer.from(got!.response!.body).toString()).toBe(raw);
    expect((await s.get(other))?.state).toBe('in_progress');
  });

  it.each([null, '', "sha256:'\"]]\\%*", 'a:b::c:', 'ключ-🔑-鍵'])(
    'keeps fingerprint %j and createdAt exact as the record is claimed, renewed, met in flight, completed and replayed',
    async (fp) => {
      // Each step stores the record in another form (see scripts.ts); all must read the same.
      const s = store();
      const k = key('fp');
      const claim = await s.begin(k, fp, 60_000);
      if (claim.kind !== 'acquired') throw new Error('expected acquired');
      const claimed = await s.get(k);
      expect(claimed?.fingerprint).toBe(fp);
      expect(await s.renew(k, claim.token, 90_000)).toBe(true);
      const renewed = await s.get(k);
      expect(renewed).toMatchObject({ fingerprint: fp, createdAt: claimed!.createdAt, state: 'in_progress' });
      expect(renewed!.leaseExpiresAt).toBeGreaterThanOrEqual(claimed!.leaseExpiresAt! + 30_000);
      const busy = await s.begin(k, 'other', 60_000);
      expect(busy.kind === 'existing' && busy.record).toEqual(renewed);
      expect(await s.complete(k, claim.token, response(new Uint8Array([9])), 60_000)).toBe(true);
      const done = await s.get(k);
      expect(done).toMatchObject({ fingerprint: fp, createdAt: claimed!.createdAt, state: 'completed' });
      const replay = await s.begin(k, 'other', 60_000);
      expect(replay.kind === 'existing' && replay.record).toEqual(done);
    },
  );
});

describe('time and expiry come from Redis', () => {
  it('dates lease and TTL by Redis TIME even when this process clock is a year off', async () => {
    const s = store();
    const k = key('clock');
    const before = await redisNow(redis);
    vi.useFakeTimers({ toFake: ['Date'] });
    vi.setSystemTime(before + 365 * 24 * 3600_000);
    const token = await acquire(s, k, 60_000);
    const rec = await s.get(k);
    expect(rec?.createdAt).toBeGreaterThanOrEqual(before);
    expect(rec?.createdAt).toBeLessThan(before + 5_000);
    expect(rec?.leaseExpiresAt).toBe(rec!.createdAt + 60_000);
    expect(await s.complete(k, token, response(new Uint8Array([1])), 10_000)).toBe(true);
    const done = await s.get(k);
    expect(done?.expiresAt).toBeGreaterThanOrEqual(before + 10_000);
    expect(done?.expiresAt).toBeLessThan(before + 15_000);
  });

  it('sets PEXPIRE = lease + grace while in progress and = TTL once completed', async () => {
    const s = store({ leaseGraceMs: 5_000 });
    const k = key('pttl');
    const token = await acquire(s, k, 20_000);
    const inProgress = await redis.pttl(prefix + k);
    expect(inProgress).toBeGreaterThan(24_000);
    expect(inProgress).toBeLessThanOrEqual(25_000);
    expect(await s.renew(k, token, 40_000)).toBe(true);
    expect(await redis.pttl(prefix + k)).toBeGreaterThan(44_000);
    expect(await s.complete(k, token, response(new Uint8Array([1])), 3_000)).toBe(true);
    const ttl = await redis.pttl(prefix + k);
    expect(ttl).toBeGreaterThan(2_000);
    expect(ttl).toBeLessThanOrEqual(3_000);
  });

  it('within the grace an expired lease is taken over with tookOver: true', async () => {
    const s = store({ leaseGraceMs: 60_000 });
    const k = key('takeover');
    const old = await acquire(s, k, 200);
    await vi.waitFor(async () => expect(await s.get(k)).toBeUndefined(), { timeout: 5_000, interval: 20 });
    // The expired holder is refused even before anyone took over.
    expect(await s.renew(k, old, 60_000)).toBe(false);
    const r = await s.begin(k, 'fp2', 60_000);
    expect(r).toMatchObject({ kind: 'acquired', tookOver: true });
    expect(await s.complete(k, old, response(new Uint8Array([1])), 60_000)).toBe(false);
    expect(await s.release(k, old)).toBe(false);
    expect((await s.get(k))?.fingerprint).toBe('fp2');
  });

  it('after the grace Redis has dropped the key natively, so the claim is new (tookOver: false)', async () => {
    const s = store({ leaseGraceMs: 0 });
    const k = key('gone');
    await acquire(s, k, 200);
    await vi.waitFor(async () => expect(await redis.exists(prefix + k)).toBe(0), { timeout: 5_000, interval: 20 });
    expect(await s.begin(k, 'fp', 60_000)).toMatchObject({ kind: 'acquired', tookOver: false });
  });

  it('purgeExpired returns 0: Redis expires records itself', async () => {
    expect(await store().purgeExpired(100)).toBe(0);
  });
});

/**
 * Redis refuses every write command, before it looks at the key, at `maxmemory` with the README's
 * `noeviction` (OOM), while `min-replicas-to-write` cannot be met (NOREPLICAS: a replica down,
 * which the README's failover advice makes a refusal) or while it cannot persist (MISCONF: a failed
 * RDB save, an AOF write error). `SET … NX GET` is such a write even when it would only read; a
 * script is refused only when it writes.
 */
describe('a Redis refusing writes (OOM, NOREPLICAS, MISCONF, READONLY)', () => {
  const refusals = {
    async OOM(client: Redis): Promise<void> {
      await client.config('SET', 'maxmemory-policy', 'noeviction');
      await client.config('SET', 'maxmemory', '1');
    },
    async NOREPLICAS(client: Redis): Promise<void> {
      await client.config('SET', 'min-replicas-to-write', '1');
    },
    async MISCONF(client: Redis, dir: string): Promise<void> {
      rmSync(dir, { recursive: true, force: true });
      await client.config('SET', 'save', '3600 1');
      await client.bgsave();
      // The save fails in the background (its directory is gone): wait until Redis says so.
      while (!/rdb_last_bgsave_status:err/.test(await client.info('persistence'))) await new Promise((r) => setTimeout(r, 20));
    },
    async READONLY(client: Redis): Promise<void> {
      // A master demoted by a failover, to a master it cannot reach yet: it keeps its data and
      // serves reads, and refuses writes on the connections it kept open.
      await client.replicaof('127.0.0.1', 1);
    },
  } as const;
  const cases = (['set', 'script'] as const).flatMap((claim) => (['OOM', 'NOREPLICAS', 'MISCONF', 'READONLY'] as const).map((refusal) => [claim, refusal] as const));

  it.each(cases)('claim: %s still replays a completed key and answers a running one under %s; only a new key is refused', async (claim, refusal) => {
    const dir = mkdtempSync(join(tmpdir(), 'idemkit-redis-'));
    const own = await ownRedisServer(['--dir', dir]);
    const s = createRedisStore({ client: own.client, prefix, claim });
    try {
      const done = key('refused-done');
      const running = key('refused-running');
      const token = await acquire(s, done);
      expect(await s.complete(done, token, response(new Uint8Array([1, 2, 3])), 60_000)).toBe(true);
      await acquire(s, running);
      await refusals[refusal](own.client, dir);
      // Before, with claim 'set': both were refused, so every retry of a finished request got 503.
      const replay = await s.begin(done, 'fp', 60_000);
      expect(replay).toMatchObject({ kind: 'existing', record: { state: 'completed' } });
      expect(replay.kind === 'existing' && [...(replay.record.response?.body ?? [])]).toEqual([1, 2, 3]);
      expect(await s.begin(running, 'fp', 60_000)).toMatchObject({ kind: 'existing', record: { state: 'in_progress' } });
      await expect(s.begin(key('refused-new'), 'fp', 60_000)).rejects.toThrow(new RegExp(`^${refusal} `));
    } finally {
      await own.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('client ownership and failures', () => {
  it('close() on a store built from your client leaves the client connected', async () => {
    const client = await redisClient(url);
    const s = createRedisStore({ client, prefix });
    await acquire(s, key('own'));
    await s.close();
    await s.close();
    expect(client.status).toBe('ready');
    expect(await client.ping()).toBe('PONG');
    await expect(s.get(key('after-close'))).rejects.toThrow(/closed/);
    await client.quit();
  });

  it('a store built from `url` owns its client and close() quits it', async () => {
    const s = createRedisStore({ url, prefix });
    const k = key('url');
    const token = await acquire(s, k);
    expect(await s.complete(k, token, response(new Uint8Array([7])), 60_000)).toBe(true);
    await s.close();
    await vi.waitFor(() => expect(s.client.status).toBe('end'), { timeout: 5_000, interval: 10 });
    await s.close();
  });

  it('close() on a store built from `url` while Redis is unreachable: resolves at once and leaves no client reconnecting', async () => {
    const target = new URL(url);
    const proxy = await answerHoldingProxy(target.hostname, Number(target.port || 6379));
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => undefined);
    const s = createRedisStore({ url: `redis://127.0.0.1:${proxy.port}`, prefix });
    try {
      await s.get(key('connected'));
      proxy.refuse(true);
      proxy.cut();
      await vi.waitFor(() => expect(s.client.status).not.toBe('ready'), { timeout: 5_000, interval: 10 });
      // A request in flight when the app shuts down: queued until Redis is back.
      const inFlight = s.begin(key('in-flight'), 'fp', 60_000).catch((error: unknown) => error);
      const started = Date.now();
      // Before: rejected after ~10 s with MaxRetriesPerRequestError, the client still reconnecting
      // (the process never exited).
      await s.close();
      expect(Date.now() - started).toBeLessThan(2_000);
      // And it stopped trying: with Redis reachable again, it does not connect (a client that
      // reconnects keeps the process alive after shutdown).
      const before = proxy.accepted();
      proxy.refuse(false);
      await new Promise((resolve) => setTimeout(resolve, 1_500));
      expect(s.client.status).not.toBe('ready');
      expect(proxy.accepted()).toBe(before);
      void inFlight; // bounded by the engine's storeTimeoutMs (a 503), as any store call
    } finally {
      s.client.disconnect();
      await proxy.close();
      warn.mockRestore();
    }
  });

  it('close() of a url-built store lets a completion already sent finish while Redis is paused for a moment (a failover\'s CLIENT PAUSE)', async () => {
    const own = await ownRedisServer();
    const s = createRedisStore({ url: own.url, prefix });
    try {
      const k = key('paused');
      const token = await acquire(s, k);
      await own.client.call('CLIENT', 'PAUSE', '1500', 'WRITE');
      const completing = s.complete(k, token, response(new Uint8Array([9])), 60_000);
      // Before: QUIT got 1 s, then the socket was dropped with the completion unanswered: the key
      // stayed in progress and its retry, after the lease, ran the handler again.
      await s.close();
      expect(await completing).toBe(true);
      const check = createRedisStore({ client: own.client, prefix });
      expect(await check.get(k)).toMatchObject({ state: 'completed' });
    } finally {
      await own.stop();
    }
  });

  it('a store built from `url` says once that Redis is unreachable, not on every reconnect', async () => {
    // A port nothing listens on: every reconnect fails.
    const port = await new Promise<number>((resolve) => {
      const probe = createServer().listen(0, '127.0.0.1', () => {
        const { port: free } = probe.address() as AddressInfo;
        probe.close(() => resolve(free));
      });
    });
    const error = vi.spyOn(console, 'error').mockImplementation(() => undefined);
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => undefined);
    const s = createRedisStore({ url: `redis://127.0.0.1:${port}`, prefix });
    try {
      // Counted without an 'error' listener of our own: with one, ioredis would not print anyway.
      let reconnects = 0;
      s.client.on('reconnecting', () => reconnects++);
      await vi.waitFor(() => expect(reconnects).toBeGreaterThanOrEqual(4), { timeout: 10_000, interval: 20 });
      // Before, ioredis printed "[ioredis] Unhandled error event" and a stack for each of them.
      expect(error).not.toHaveBeenCalled();
      expect(warn).toHaveBeenCalledTimes(1);
      expect(String(warn.mock.calls[0]?.[0])).toMatch(/^\[idemkit\] \[redis\] .*ECONNREFUSED.*keeps reconnecting/);
    } finally {
      await s.close().catch(() => undefined);
      s.client.disconnect();
      error.mockRestore();
      warn.mockRestore();
    }
  });

  it('a store built from `url` drops a connection that went silent (5 s socket timeout) and carries on over a new one', async () => {
    const target = new URL(url);
    const proxy = await answerHoldingProxy(target.hostname, Number(target.port || 6379));
    const s = createRedisStore({ url: `redis://127.0.0.1:${proxy.port}`, prefix });
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => undefined);
    try {
      const k = key('black-hole');
      await s.get(k); // connected, scripts loaded
      proxy.holdAnswers(); // that connection's answers never come back; new connections pass
      const pending = s.begin(k, 'fp', 60_000);
      // Before: pending for good, and every later command queued behind it. Now ioredis drops the
      // silent socket after 5 s, reconnects, and re-sends the claim, which answers as the claim
      // it already is (same token).
      const answer = await Promise.race([pending, new Promise<'still waiting'>((r) => setTimeout(() => r('still waiting'), 9_000).unref())]);
      expect(answer).toMatchObject({ kind: 'acquired' });
      expect(await s.get(key('after'))).toBeUndefined();
    } finally {
      await s.close().catch(() => undefined);
      s.client.disconnect();
      await proxy.close();
      warn.mockRestore();
    }
  }, 15_000);

  it('a store built from `url` leaves a master demoted to replica by a failover (READONLY) instead of failing every call on it for good', async () => {
    // A failover behind one address (a cloud "primary endpoint" whose DNS moves to the promoted
    // replica): the old master becomes a replica and keeps its client connections open, answering
    // every write with READONLY. Only a new connection reaches the new master.
    const oldMaster = await ownRedisServer();
    const newMaster = await ownRedisServer();
    const hop = await retargetableHop(Number(new URL(oldMaster.url).port));
    const s = createRedisStore({ url: hop.url, prefix });
    try {
      expect((await s.begin(key('before-failover'), 'fp', 60_000)).kind).toBe('acquired');
      await newMaster.client.replicaof('NO', 'ONE');
      await oldMaster.client.replicaof('127.0.0.1', Number(new URL(newMaster.url).port));
      hop.retarget(Number(new URL(newMaster.url).port));
      // The command that meets READONLY fails, and the client reconnects. With the default
      // claim: 'set' that command is the SET, refused as under OOM, and the begin script that
      // follows goes out on the new connection: even this first call reaches the new master.
      // Before, every call failed with READONLY until the process restarted.
      const k = key('after-failover');
      const outcomes: string[] = [];
      for (let i = 0; i < 20 && outcomes.at(-1) !== 'acquired'; i++) {
        outcomes.push(await s.begin(k, 'fp', 60_000).then((r) => r.kind, (error: Error) => error.message.split(' ')[0] ?? ''));
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      expect(outcomes).toEqual(['acquired']);
      expect(await newMaster.client.exists(prefix + k)).toBe(1);
      // With claim: 'script' the first call is the script itself: it fails (a 503 the client
      // retries), and the next reaches the new master.
      const k2 = key('after-failover-script');
      const viaScript = createRedisStore({ client: s.client, prefix, claim: 'script' });
      await oldMaster.client.replicaof('NO', 'ONE');
      await newMaster.client.replicaof('127.0.0.1', Number(new URL(oldMaster.url).port));
      hop.retarget(Number(new URL(oldMaster.url).port));
      await expect(viaScript.begin(k2, 'fp', 60_000)).rejects.toThrow(/^READONLY /);
      expect(await viaScript.begin(k2, 'fp', 60_000)).toMatchObject({ kind: 'acquired' });
      expect(await oldMaster.client.exists(prefix + k2)).toBe(1);
    } finally {
      await s.close().catch(() => undefined);
      s.client.disconnect();
      await hop.close();
      await oldMaster.stop();
      await newMaster.stop();
    }
  }, 15_000);

  it('rejects with the driver error when the connection drops mid-operation', async () => {
    // No reconnect: ioredis fails the in-flight command instead of re-sending it.
    const client = new Redis(url, { retryStrategy: () => null });
    await client.ping();
    const s = createRedisStore({ client, prefix });
    const k = key('drop');
    await s.get(k); // scripts sent once, connection warm
    const pending = s.begin(k, 'fp', 60_000);
    // The command is on the wire; its reply will never be read.
    client.stream.destroy();
    await expect(pending).rejects.toThrow(/Connection is closed/);
    // And every later operation too: nothing is swallowed into `false` or `undefined`.
    await expect(s.complete(k, 'x' as LeaseToken, response(new Uint8Array()), 1_000)).rejects.toThrow(
      /Connection is closed/,
    );
    await expect(s.get(k)).rejects.toThrow(/Connection is closed/);
    await expect(s.release(k, 'x' as LeaseToken)).rejects.toThrow(/Connection is closed/);
  });

  it('a claim whose answer was lost (commandTimeout) is given back: the caller saw a failure, so the key is free', async () => {
    const target = new URL(url);
    const proxy = await answerHoldingProxy(target.hostname, Number(target.port || 6379));
    const client = new Redis({ host: '127.0.0.1', port: proxy.port, commandTimeout: 100, maxRetriesPerRequest: 0 });
    try {
      const s = createRedisStore({ client, prefix });
      const k = key('lost-answer');
      await s.get(k); // scripts loaded, connection warm
      proxy.holdAnswers(); // commands land, their answers never come back
      await expect(s.begin(k, 'fp', 60_000)).rejects.toThrow(/timed out/);
      // The SET reached Redis; the release sent after it (same connection, same order) too.
      // Before, the claim stayed for the whole lease and every retry got 409.
      await vi.waitFor(async () => expect(await redis.exists(prefix + k)).toBe(0), { timeout: 3_000, interval: 20 });
      expect(await store().begin(k, 'fp', 60_000)).toMatchObject({ kind: 'acquired', tookOver: false });
    } finally {
      client.disconnect();
      await proxy.close();
    }
  });

  // ioredis re-sends a command whose reply a dropped connection lost (autoResendUnfulfilledCommands).
  // Before, a re-sent completion that had landed found a completed record without a token and
  // answered 0: the holder logged a lost lease and emitted `stored: false` for a stored answer.
  for (const [label, bytes] of [
    ['one command', 3],
    ['in chunks', 600 * 1024],
  ] as const) {
    it(`a completion re-sent after its reply was lost (${label}) answers true, as its first send did`, async () => {
      const target = new URL(url);
      const proxy = await answerHoldingProxy(target.hostname, Number(target.port || 6379));
      const client = new Redis({ host: '127.0.0.1', port: proxy.port });
      try {
        const s = createRedisStore({ client, prefix });
        const k = key('resent-complete');
        const token = await acquire(s, k);
        const body = new Uint8Array(bytes).map((_, i) => i & 0xff);
        proxy.holdAnswers(); // the completion lands, its reply never comes back
        const completing = s.complete(k, token, response(body), 60_000);
        // Landed: the record is completed (tag c or d) though the store has no answer yet.
        await vi.waitFor(async () => expect((await redis.getBuffer(prefix + k))?.subarray(0, 2).toString()).toMatch(/^[cd]:$/), { timeout: 3_000, interval: 10 });
        proxy.cut(); // ioredis reconnects and sends the completion again
        expect(await completing).toBe(true);
        const stored = await store().get(k);
        expect(stored?.state).toBe('completed');
        expect(Buffer.from(stored?.response?.body ?? new Uint8Array()).equals(body)).toBe(true);
      } finally {
        client.disconnect();
        await proxy.close();
      }
    });
  }

  it('a completed key still refuses another lease, and the same lease sending another answer (its 410 marker, a racing call)', async () => {
    const s = store();
    const k = key('completed-refuses');
    const token = await acquire(s, k);
    expect(await s.complete(k, token, response(new Uint8Array([1])), 60_000)).toBe(true);
    expect(await s.complete(k, token, response(new Uint8Array([1])), 60_000)).toBe(true); // a re-send
    expect(await s.complete(k, token, response(new Uint8Array([1]), 410), 60_000)).toBe(false);
    expect(await s.complete(k, token, { ...response(new Uint8Array([1])), headers: [] }, 60_000)).toBe(false);
    expect(await s.complete(k, token, response(new Uint8Array([2])), 60_000)).toBe(false);
    expect(await s.complete(k, token, response(new Uint8Array([1, 1])), 60_000)).toBe(false);
    expect(await s.complete(k, 'another' as LeaseToken, response(new Uint8Array([1])), 60_000)).toBe(false);
    expect(await s.release(k, token)).toBe(false);
    expect(await s.renew(k, token, 60_000)).toBe(false);
    expect((await s.get(k))?.response?.status).toBe(201);
  });

  it('reads a completed record written before the token was kept (tag c)', async () => {
    const s = store();
    const k = key('old-format');
    const headers = JSON.stringify([['content-type', 'text/plain']]);
    await redis.set(prefix + k, `c:1000:2000:201:2:${Buffer.byteLength(headers)}:fp${headers}hello`, 'PX', 60_000);
    const replay = await s.begin(k, 'fp', 60_000);
    expect(replay).toMatchObject({ kind: 'existing', record: { state: 'completed', fingerprint: 'fp', createdAt: 1000, expiresAt: 2000 } });
    const record = await s.get(k);
    expect(record?.response?.status).toBe(201);
    expect(record?.response?.headers).toEqual([['content-type', 'text/plain']]);
    expect(Buffer.from(record?.response?.body ?? new Uint8Array()).toString()).toBe('hello');
  });

  it('a lost claim is given back even when Redis then stays unreachable for a while (maxRetriesPerRequest: 0)', async () => {
    const target = new URL(url);
    const proxy = await answerHoldingProxy(target.hostname, Number(target.port || 6379));
    const client = new Redis({ host: '127.0.0.1', port: proxy.port, maxRetriesPerRequest: 0 });
    client.on('error', () => undefined);
    let reconnects = 0;
    client.on('reconnecting', () => reconnects++);
    try {
      const s = createRedisStore({ client, prefix });
      const k = key('lost-then-down');
      await s.get(k); // scripts loaded, connection warm
      proxy.holdAnswers();
      const pending = s.begin(k, 'fp', 60_000);
      await vi.waitFor(async () => expect(await redis.exists(prefix + k)).toBe(1), { timeout: 3_000, interval: 10 });
      // The SET landed, its answer is lost, and Redis goes out of reach.
      proxy.refuse(true);
      proxy.cut();
      await expect(pending).rejects.toThrow();
      // A reconnect attempt has failed since: ioredis dropped what it had queued, the first release too.
      await vi.waitFor(() => expect(reconnects).toBeGreaterThanOrEqual(2), { timeout: 5_000, interval: 10 });
      proxy.refuse(false);
      // Before, the claim stayed for the whole lease and every retry got 409.
      await vi.waitFor(async () => expect(await redis.exists(prefix + k)).toBe(0), { timeout: 5_000, interval: 20 });
    } finally {
      client.disconnect();
      await proxy.close();
    }
  });

  it('a begin ioredis refused unsent (enableOfflineQueue: false, Redis out of reach) sends no releases: nothing landed', async () => {
    const target = new URL(url);
    const proxy = await answerHoldingProxy(target.hostname, Number(target.port || 6379));
    const client = new Redis({ host: '127.0.0.1', port: proxy.port, enableOfflineQueue: false });
    client.on('error', () => undefined);
    try {
      const s = createRedisStore({ client, prefix });
      const k = key('offline');
      // Without the offline queue, nothing may be sent before the connection is up.
      await vi.waitFor(() => expect(client.status).toBe('ready'), { timeout: 3_000, interval: 10 });
      await s.get(k); // scripts loaded
      proxy.refuse(true);
      proxy.cut();
      await vi.waitFor(() => expect(client.status).not.toBe('ready'), { timeout: 3_000, interval: 10 });
      const sent: string[] = [];
      const original = client.sendCommand.bind(client);
      client.sendCommand = ((command: Parameters<typeof original>[0]) => {
        sent.push(command.name);
        return original(command);
      }) as typeof client.sendCommand;
      await expect(s.begin(k, 'fp', 60_000)).rejects.toThrow(/enableOfflineQueue options is false/);
      // Before: a release went out at once (refused the same way), then more for the whole lease.
      expect(sent).toEqual(['set']);
    } finally {
      client.disconnect();
      await proxy.close();
    }
  });

  it('rejects every operation on a client you disconnected', async () => {
    const client = await redisClient(url);
    const s = createRedisStore({ client, prefix });
    client.disconnect();
    await expect(s.begin(key('disc'), 'fp', 1_000)).rejects.toThrow(/Connection is closed/);
    await expect(s.renew(key('disc'), 'x' as LeaseToken, 1_000)).rejects.toThrow(/Connection is closed/);
  });

  it.each(['set', 'script'] as const)(
    "a begin that ioredis re-sends after its first send claimed the key still owns the claim (claim: '%s')",
    async (claim) => {
      // Default ioredis re-sends unanswered commands after a reconnect. Make the first send land
      // but its reply get lost: stop reading the socket, wait until Redis holds the claim, drop
      // the connection. The re-sent begin meets its own claim and must not be locked out of it.
      const client = await redisClient(url);
      const s = createRedisStore({ client, prefix, claim });
      const k = key('resend');
      await s.get(k); // scripts loaded, connection warm
      client.stream.pause();
      const pending = s.begin(k, 'fp', 60_000);
      await vi.waitFor(async () => expect(await redis.exists(prefix + k)).toBe(1), { timeout: 5_000, interval: 5 });
      const firstClaim = await redis.get(prefix + k);
      client.stream.destroy();
      const r = await pending;
      expect(r.kind).toBe('acquired');
      if (r.kind !== 'acquired') return;
      expect(firstClaim).toContain(r.token);
      expect(await s.complete(k, r.token, response(new Uint8Array([1])), 60_000)).toBe(true);
      await client.quit();
    },
  );

  it.each(['set', 'script'] as const)(
    "a begin re-sent after its first claim's lease ran out gets a live lease, not the dead one (claim: '%s')",
    async (claim) => {
      // As above, but the reply stays lost until the first claim's lease is over (the grace keeps
      // the key in Redis). Handing the caller that claim back would let it run the handler while
      // the next request takes the key over: two runs at once.
      const client = await redisClient(url);
      const s = createRedisStore({ client, prefix, claim, leaseGraceMs: 60_000 });
      const other = store({ leaseGraceMs: 60_000 });
      const k = key('resend-late');
      await s.get(k);
      client.stream.pause();
      const pending = s.begin(k, 'fp', 300);
      await vi.waitFor(async () => expect(await redis.exists(prefix + k)).toBe(1), { timeout: 5_000, interval: 5 });
      // By the Redis clock: `get` reports a claim whose lease has run out as absent.
      await vi.waitFor(async () => expect(await other.get(k)).toBeUndefined(), { timeout: 5_000, interval: 20 });
      client.stream.destroy();
      const r = await pending;
      expect(r.kind).toBe('acquired');
      if (r.kind !== 'acquired') return;
      // Its own claim, claimed afresh: nobody else's lease was taken over (no takeover warning).
      expect(r.tookOver).toBe(false);
      const held = await other.get(k);
      expect(held?.state).toBe('in_progress');
      expect(held?.leaseExpiresAt).toBeGreaterThan(Date.now() - 5_000);
      expect((await other.begin(k, 'fp', 300)).kind).toBe('existing');
      expect(await s.complete(k, r.token, response(new Uint8Array([1])), 60_000)).toBe(true);
      await client.quit();
    },
  );

  it.each(['set', 'script'] as const)(
    "works on a client created with ioredis's stringNumbers: true (claim: '%s')",
    async (claim) => {
      // That option turns every integer reply into a string, the scripts' 1 into '1'. Read as
      // "not renewed", it would make the engine stop renewing a lease that is fine.
      const client = new Redis(url, { stringNumbers: true });
      const s = createRedisStore({ client, prefix, claim, leaseGraceMs: 60_000 });
      try {
        const k = key('string-numbers');
        const first = await s.begin(k, 'fp', 60_000);
        expect(first.kind).toBe('acquired');
        if (first.kind !== 'acquired') return;
        const busy = await s.begin(k, 'fp', 60_000);
        expect(busy.kind === 'existing' && busy.record.state).toBe('in_progress');
        expect(busy.kind === 'existing' && busy.leaseRemainingMs).toBeGreaterThan(50_000);
        expect(await s.renew(k, first.token, 60_000)).toBe(true);
        expect((await s.get(k))?.state).toBe('in_progress');
        expect(await s.complete(k, first.token, response(new Uint8Array([4])), 60_000)).toBe(true);
        const replay = await s.begin(k, 'fp', 60_000);
        expect(replay.kind === 'existing' && replay.record.response?.body).toEqual(new Uint8Array([4]));

        const released = key('string-numbers-release');
        expect(await s.release(released, await acquire(s, released))).toBe(true);
        expect(await s.get(released)).toBeUndefined();

        const lapsed = key('string-numbers-takeover');
        const old = await acquire(s, lapsed, 100);
        await vi.waitFor(async () => expect(await s.get(lapsed)).toBeUndefined(), { timeout: 5_000, interval: 20 });
        const taken = await s.begin(lapsed, 'fp', 60_000);
        expect(taken.kind === 'acquired' && taken.tookOver).toBe(true);
        expect(await s.complete(lapsed, old, response(new Uint8Array([5])), 60_000)).toBe(false);
      } finally {
        await client.quit();
      }
    },
  );

  it('passes a server error through (WRONGTYPE on a key that is not a string)', async () => {
    const s = store();
    const k = key('wrongtype');
    await redis.hset(prefix + k, 'state', 'completed');
    await expect(s.begin(k, 'fp', 1_000)).rejects.toThrow(/WRONGTYPE/);
    expect(await redis.hget(prefix + k, 'state')).toBe('completed');
  });

  it('refuses a foreign string under its prefix with a clear error, and leaves it as it was', async () => {
    const s = store();
    for (const foreign of ['not a record', 'c:garbage', 'c:1:2:201:x:2:[]', 'i:1:2', 'p:x:y:token']) {
      const k = key('foreign');
      await redis.set(prefix + k, foreign);
      await expect(s.begin(k, 'fp', 1_000)).rejects.toThrow(/not an idemkit record/);
      await expect(s.get(k)).rejects.toThrow(/not an idemkit record/);
      expect(await s.complete(k, 'token' as LeaseToken, response(new Uint8Array([1])), 1_000)).toBe(false);
      expect(await redis.get(prefix + k)).toBe(foreign);
    }
  });

  it('validates options up front, naming the option (and the types refuse the first two)', () => {
    // @ts-expect-error neither `client` nor `url`: the options are a union, so this no longer compiles
    expect(() => createRedisStore({})).toThrow(/Missing required option `client`/);
    // @ts-expect-error both
    expect(() => createRedisStore({ client: redis, url })).toThrow(/either `client` or `url`/);
    expect(() => createRedisStore({ url: 'http://x' })).toThrow(/`url`/);
    expect(() => createRedisStore({ client: redis, leaseGraceMs: -1 })).toThrow(/`leaseGraceMs`/);
    expect(() => createRedisStore({ client: redis, claim: 'lua' as 'set' })).toThrow(/`claim` must be 'set' or 'script'/);
    // Before, these failed with "client.defineCommand is not a function" or a TypeError from deep inside.
    expect(() => createRedisStore(undefined as never)).toThrow(/Options must be an object/);
    expect(() => createRedisStore({ client: url as never })).toThrow(/`client` must be an ioredis Redis or Cluster client \(for a URL string, use `url`\)/);
    expect(() => createRedisStore({ client: {} as never })).toThrow(/`client` must be an ioredis/);
  });

  it('warns about options it does not know (ioredis calls its prefix `keyPrefix`)', () => {
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => undefined);
    try {
      createRedisStore({ client: redis, keyPrefix: 'app:' } as never);
      expect(warn).toHaveBeenCalledWith('[idemkit] [redis] Unknown option(s) ignored: keyPrefix.');
    } finally {
      warn.mockRestore();
    }
  });

  it('rejects a non-positive lease or TTL before touching Redis', async () => {
    const s = store();
    await expect(s.begin(key('bad'), 'fp', 0)).rejects.toThrow(RangeError);
    await expect(s.complete(key('bad'), 'x' as LeaseToken, response(new Uint8Array()), -5)).rejects.toThrow(RangeError);
  });
});
