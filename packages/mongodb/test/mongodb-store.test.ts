import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it, onTestFinished, vi } from 'vitest';
import { MongoClient, MongoError, MongoServerError, ServerApiVersion } from 'mongodb';
import { MongoClient as OtherCopyMongoClient } from 'mongodb-7.8';
import type { CommandStartedEvent, Db, MongoClientOptions, ServerDescriptionChangedEvent } from 'mongodb';
import { ConfigurationError, createIdempotencyEngine, scopedKey } from '@idemkit/core';
import { answerHoldingProxy, type AnswerHoldingProxy } from '@idemkit/test-services';
import type { LeaseToken, StoredResponse } from '@idemkit/core';
import { CLAIM_WINDOW_MS, createMongoStore, DEFAULTS, PLAIN_INDEX_NAME, TTL_INDEX_NAME } from '../src/index.js';
import type { IdempotencyDocument } from '../src/index.js';
import { ASK_AGAIN_AFTER_MS } from '../src/clock.js';
import { openTestDatabase } from './mongo.js';
import type { TestDatabase } from './mongo.js';

let t: TestDatabase;
let n = 0;
const key = (label: string) => `${label}-${++n}`;
const response = (body: Uint8Array, status = 201): StoredResponse => ({
  status,
  headers: [
    ['content-type', 'application/octet-stream'],
    ['set-cookie', 'a=1'],
    ['set-cookie', 'b=2'],
  ],
  body,
});
const silent = { warn: () => undefined };

/**
 * A taker whose process dies between its claim and its write: the store's record writes never
 * answer from now on. Resolves once the first of them has been sent.
 */
function writesNeverAnswer(store: ReturnType<typeof createMongoStore>): Promise<void> {
  return new Promise<void>((sent) => {
    store.collection.updateOne = (async () => {
      sent();
      return new Promise<never>(() => undefined);
    }) as unknown as typeof store.collection.updateOne;
  });
}

beforeAll(async () => {
  t = await openTestDatabase('mongodb_store');
});
afterAll(async () => {
  await t?.close();
});

describe('createMongoStore options', () => {
  it('defaults to the idempotency_keys collection of the given Db', () => {
    const store = createMongoStore({ db: t.db });
    expect(store.collection.collectionName).toBe('idempotency_keys');
    expect(DEFAULTS).toEqual({ collectionName: 'idempotency_keys', clock: 'server', clockRefreshMs: 60_000, fencing: 'auto' });
    expect(store.claimsCollection.collectionName).toBe('idempotency_keys_claims');
    expect(store.shared).toBe(true);
  });

  it('uses the given Collection as is', () => {
    const collection = t.db.collection<IdempotencyDocument>('custom');
    expect(createMongoStore({ collection }).collection).toBe(collection);
    expect(createMongoStore({ db: t.db, collectionName: 'other' }).collection.collectionName).toBe('other');
  });

  it('rejects bad options at setup, naming the option', () => {
    const bad = (o: unknown) => () => createMongoStore(o as Parameters<typeof createMongoStore>[0]);
    expect(bad(undefined)).toThrow(ConfigurationError);
    expect(bad({})).toThrow(/exactly one of `collection` or `db`/);
    expect(bad({ db: t.db, collection: t.db.collection('x') })).toThrow(/exactly one/);
    expect(bad({ db: t.db, collectionName: '' })).toThrow(/`collectionName`/);
    expect(bad({ db: t.db, clock: 'wall' })).toThrow(/`clock`/);
    expect(bad({ db: t.db, clockRefreshMs: 0 })).toThrow(/`clockRefreshMs`/);
    expect(bad({ db: t.db, fencing: 'optimistic' })).toThrow(/`fencing`/);
    expect(bad({ collection: {} })).toThrow(/`collection`/);
    expect(bad({ collection: t.db.collection('x'), collectionName: 'y' })).toThrow(/`collectionName` applies only with `db`/);
  });

  it('warns through its logger about options it does not know', () => {
    const warnings: string[] = [];
    createMongoStore({ db: t.db, collection_name: 'orders_keys', logger: { warn: (m: string) => warnings.push(m) } } as never);
    expect(warnings).toEqual(['[idemkit] [mongodb] Unknown option(s) ignored: collection_name.']);
  });
});

describe('atomic begin', () => {
  it('200 concurrent begins from two separate MongoClients: exactly one winner', async () => {
    const [a, b] = await Promise.all([t.client(), t.client()]);
    const storeA = createMongoStore({ db: a.db(t.dbName) });
    const storeB = createMongoStore({ db: b.db(t.dbName) });
    for (let round = 0; round < 3; round++) {
      const k = key('race');
      const results = await Promise.all(
        Array.from({ length: 200 }, (_, i) => (i % 2 === 0 ? storeA : storeB).begin(k, 'fp', 30_000)),
      );
      const winners = results.filter((r) => r.kind === 'acquired');
      expect(winners).toHaveLength(1);
      const token = winners[0]?.kind === 'acquired' ? winners[0].token : undefined;
      for (const r of results) {
        if (r.kind === 'existing') {
          expect(r.record.state).toBe('in_progress');
          expect(r.leaseRemainingMs).toBeGreaterThan(0);
        }
      }
      expect(await storeA.complete(k, token as LeaseToken, response(new Uint8Array([round])), 60_000)).toBe(true);
    }
  });

  it('concurrent takeovers of an expired lease: exactly one winner, the stale holder is refused', async () => {
    const [a, b] = await Promise.all([t.client(), t.client()]);
    const storeA = createMongoStore({ db: a.db(t.dbName) });
    const storeB = createMongoStore({ db: b.db(t.dbName) });
    for (let round = 0; round < 5; round++) {
      const k = key('takeover');
      const first = await storeA.begin(k, 'fp', 50);
      expect(first.kind).toBe('acquired');
      await vi.waitFor(async () => expect(await storeA.get(k)).toBeUndefined(), { timeout: 5_000, interval: 20 });
      const results = await Promise.all(
        Array.from({ length: 100 }, (_, i) => (i % 2 === 0 ? storeA : storeB).begin(k, 'fp', 30_000)),
      );
      const winners = results.filter((r) => r.kind === 'acquired');
      expect(winners).toHaveLength(1);
      expect(winners[0]).toMatchObject({ kind: 'acquired', tookOver: true });
      const stale = first.kind === 'acquired' ? first.token : ('' as LeaseToken);
      expect(await storeB.complete(k, stale, response(new Uint8Array([1])), 60_000)).toBe(false);
      expect(await storeB.release(k, stale)).toBe(false);
      expect(await storeB.renew(k, stale, 1_000)).toBe(false);
      expect((await storeA.get(k))?.state).toBe('in_progress');
    }
  });

  it('claims fencing: two takers either side of a claim window boundary, one stalled between claim and write: one takeover', async () => {
    // Each store's clock is Date here, so the test can put the two takers 20 ms apart across
    // the 10 s boundary. Taker A claims and checks the record, then stalls before it writes (a GC
    // pause, a slow network); taker B comes in just past the boundary.
    const [a, b] = await Promise.all([t.client(), t.client()]);
    const storeA = createMongoStore({ db: a.db(t.dbName), collectionName: 'boundary', fencing: 'claims', clock: 'local' });
    const storeB = createMongoStore({ db: b.db(t.dbName), collectionName: 'boundary', fencing: 'claims', clock: 'local' });
    const k = key('window-boundary');
    vi.useFakeTimers({ toFake: ['Date'] });
    try {
      const t0 = Date.now();
      const first = await storeA.begin(k, 'fp', 100);
      expect(first.kind).toBe('acquired');

      let stalled!: () => void;
      const stall = new Promise<void>((resolve) => (stalled = resolve));
      let resume!: () => void;
      const resumed = new Promise<void>((resolve) => (resume = resolve));
      const updateOne = storeA.collection.updateOne.bind(storeA.collection);
      let armed = true;
      storeA.collection.updateOne = (async (...args: Parameters<typeof updateOne>) => {
        if (armed) {
          armed = false;
          stalled();
          await resumed;
        }
        return updateOne(...args);
      }) as typeof updateOne;
      let bLookedAtClaim = false;
      const claimFindOne = storeB.claimsCollection.findOne.bind(storeB.claimsCollection);
      storeB.claimsCollection.findOne = ((...args: Parameters<typeof claimFindOne>) => {
        bLookedAtClaim = true;
        return claimFindOne(...args);
      }) as typeof claimFindOne;

      vi.setSystemTime(t0 + 100 + CLAIM_WINDOW_MS - 10);
      const takerA = storeA.begin(k, 'a', 30_000);
      await stall; // A holds its claim, saw the record unchanged, and waits before writing
      vi.setSystemTime(t0 + 100 + CLAIM_WINDOW_MS + 10);
      let bSettled = false;
      const takerB = storeB.begin(k, 'b', 30_000).finally(() => (bSettled = true));
      await vi.waitFor(() => expect(bSettled || bLookedAtClaim).toBe(true), { timeout: 5_000, interval: 5 });
      resume();
      const results = await Promise.all([takerA, takerB]);
      expect(results.filter((r) => r.kind === 'acquired')).toHaveLength(1);
      const winner = results.find((r) => r.kind === 'acquired');
      const record = await storeB.get(k);
      expect(record?.fingerprint).toBe(results[0].kind === 'acquired' ? 'a' : 'b');
      expect(winner).toMatchObject({ tookOver: true });
    } finally {
      vi.useRealTimers();
    }
  });

  it('claims fencing: a holder whose completion stalls at its claim while a taker takes the lapsed lease over cannot complete', async () => {
    const [a, b] = await Promise.all([t.client(), t.client()]);
    const holder = createMongoStore({ db: a.db(t.dbName), collectionName: 'slow-holder', fencing: 'claims', clock: 'local' });
    const taker = createMongoStore({ db: b.db(t.dbName), collectionName: 'slow-holder', fencing: 'claims', clock: 'local' });
    const k = key('slow-holder');
    /** Makes `method` of `target` wait, once, until released; resolves `reached` when it is called. */
    const gateOnce = <T extends object>(target: T, method: keyof T) => {
      let reachedIt!: () => void;
      const reached = new Promise<void>((resolve) => (reachedIt = resolve));
      let release!: () => void;
      const released = new Promise<void>((resolve) => (release = resolve));
      const original = (target[method] as (...args: unknown[]) => unknown).bind(target);
      let armed = true;
      (target as Record<keyof T, unknown>)[method] = async (...args: unknown[]) => {
        if (armed) {
          armed = false;
          reachedIt();
          await released;
        }
        return original(...args);
      };
      return { reached, release };
    };
    vi.useFakeTimers({ toFake: ['Date'] });
    try {
      const t0 = Date.now();
      const first = await holder.begin(k, 'fp', 400);
      if (first.kind !== 'acquired') throw new Error('expected acquired');
      // The holder completes 50 ms before its lease ends, and its claim's insert is slow.
      const holderClaim = gateOnce(holder.claimsCollection, 'insertOne');
      vi.setSystemTime(t0 + 350);
      const completing = holder.complete(k, first.token, response(new Uint8Array([1])), 60_000);
      await holderClaim.reached;
      // Its lease runs out meanwhile; a taker claims the key, checks the record, stalls before writing.
      vi.setSystemTime(t0 + 600);
      const takerWrite = gateOnce(taker.collection, 'updateOne');
      const taking = taker.begin(k, 'fp2', 30_000);
      await takerWrite.reached;
      holderClaim.release();
      const completed = await completing;
      takerWrite.release();
      expect(await taking).toMatchObject({ kind: 'acquired', tookOver: true });
      // Told "stored" while the taker overwrote the record, the holder's answer would be lost.
      expect(completed).toBe(false);
      const record = await taker.get(k);
      expect(record).toMatchObject({ state: 'in_progress', fingerprint: 'fp2' });
    } finally {
      vi.useRealTimers();
    }
  });

  // Was: a writer stalled for more than CLAIM_WINDOW_MS between its check (a read by `_id`) and
  // its write (by `_id` alone) let a taker walk past its claim and take over; then the stalled
  // holder's complete overwrote the taker's record, its release deleted it, or a stalled taker
  // replaced it: two runs of the handler at once. The stall here is the read's answer, held on
  // the network; what the writer refuses is any stall since it stamped its claim.
  // Each waits out a claim window on real time with a proxy of its own: run side by side.
  it.concurrent.for(['complete', 'release', 'takeover'] as const)(
    'claims fencing: a %s stalled past the claim window after its check gives up, and the taker keeps the key',
    { timeout: 30_000 },
    async (op, { expect, onTestFinished }) => {
      const { proxy, client } = await throughProxy({ monitorCommands: true }, onTestFinished);
      const collectionName = `stalled-${op}`;
      const slow = createMongoStore({ db: client.db(t.dbName), collectionName, fencing: 'claims', clock: 'local' });
      const taker = createMongoStore({ db: t.db, collectionName, fencing: 'claims', clock: 'local' });
      const k = key(`stalled-${op}`);
      const first = await slow.begin(k, 'fp', 1_000);
      if (first.kind !== 'acquired') throw new Error('expected acquired');
      // The slow writer's read of the record is answered only when the test says so.
      let stalled!: () => void;
      const reading = new Promise<void>((resolve) => (stalled = resolve));
      let armed = true;
      client.on('commandStarted', (event: CommandStartedEvent) => {
        if (armed && event.commandName === 'find' && event.command['find'] === collectionName) {
          armed = false;
          proxy.stallAnswers();
          stalled();
        }
      });
      let late: Promise<unknown>;
      if (op === 'takeover') {
        await new Promise((resolve) => setTimeout(resolve, 1_100)); // the lease ends
        late = slow.begin(k, 'late', 30_000);
      } else {
        late =
          op === 'complete'
            ? slow.complete(k, first.token, response(new Uint8Array([1])), 60_000)
            : slow.release(k, first.token);
      }
      await reading;
      // The lease ends and the claim window passes: a taker walks past the slow writer's claim.
      await new Promise((resolve) => setTimeout(resolve, 1_100 + CLAIM_WINDOW_MS));
      const took = await taker.begin(k, 'taker', 30_000);
      expect(took).toMatchObject({ kind: 'acquired', tookOver: true });
      proxy.deliverHeld();
      const lateResult = await late;
      if (op === 'takeover') expect(lateResult).toMatchObject({ kind: 'existing', record: { fingerprint: 'taker' } });
      else expect(lateResult).toBe(false);
      expect(await taker.get(k)).toMatchObject({ state: 'in_progress', fingerprint: 'taker' });
      expect(await taker.begin(k, 'third', 30_000)).toMatchObject({ kind: 'existing' });
      if (took.kind === 'acquired') expect(await taker.complete(k, took.token, response(new Uint8Array([2])), 60_000)).toBe(true);
    },
  );

  it('claims fencing: a taker that died holding its claim blocks takeovers for one claim window, then the next one wins', async () => {
    const [a, b] = await Promise.all([t.client(), t.client()]);
    const storeA = createMongoStore({ db: a.db(t.dbName), collectionName: 'dead-taker', fencing: 'claims', clock: 'local' });
    const storeB = createMongoStore({ db: b.db(t.dbName), collectionName: 'dead-taker', fencing: 'claims', clock: 'local' });
    const k = key('dead-taker');
    vi.useFakeTimers({ toFake: ['Date'] });
    try {
      const t0 = Date.now();
      expect((await storeA.begin(k, 'fp', 100)).kind).toBe('acquired');
      // Taker A claims the expired lease and never writes (its process died).
      const stall = writesNeverAnswer(storeA);
      vi.setSystemTime(t0 + 200);
      void storeA.begin(k, 'a', 30_000);
      await stall;
      // One claim window later, B walks past the dead claim to the next window's.
      vi.setSystemTime(t0 + 200 + CLAIM_WINDOW_MS + 1);
      expect(await storeB.begin(k, 'b', 30_000)).toMatchObject({ kind: 'acquired', tookOver: true });
      expect((await storeB.get(k))?.fingerprint).toBe('b');
    } finally {
      vi.useRealTimers();
    }
  });

  // Was: while a dead taker's claim held the takeover up, every begin on the key spun through
  // its 24 attempts (~1 s, ~70 commands) and then threw "lost 24 races", so a healthy store
  // answered 503 (or, with onStoreError: 'pass', ran the handler without idempotency) for up to
  // CLAIM_WINDOW_MS. A takeover in progress is a running key: 409 with Retry-After.
  it('claims fencing: a begin held up by a dead taker\'s claim reads the key as running, not as a store error', async () => {
    const [a, b] = await Promise.all([t.client(), t.client()]);
    const storeA = createMongoStore({ db: a.db(t.dbName), collectionName: 'held-up', fencing: 'claims' });
    const storeB = createMongoStore({ db: b.db(t.dbName), collectionName: 'held-up', fencing: 'claims' });
    const header = key('held-up');
    const k = scopedKey(undefined, header);
    expect((await storeA.begin(k, 'fp', 100)).kind).toBe('acquired');
    await vi.waitFor(async () => expect(await storeA.get(k)).toBeUndefined(), { timeout: 5_000, interval: 20 });
    // Taker A claims the expired lease and never writes (its process died).
    const stall = writesNeverAnswer(storeA);
    void storeA.begin(k, 'a', 30_000);
    await stall;
    const held = await storeB.begin(k, 'b', 30_000);
    expect(held).toMatchObject({ kind: 'existing', record: { key: k, state: 'in_progress', fingerprint: 'b', response: null } });
    const remaining = held.kind === 'existing' ? held.leaseRemainingMs : 0;
    expect(remaining).toBeGreaterThan(0);
    expect(remaining).toBeLessThanOrEqual(CLAIM_WINDOW_MS);
    // Through the engine: 409 with Retry-After, as for any running key.
    const engine = createIdempotencyEngine({ store: storeB, logger: false });
    const decision = await engine.decide({ method: 'POST', path: '/held-up', headers: { 'idempotency-key': header }, body: undefined });
    expect(decision).toMatchObject({ kind: 'problem', error: { status: 409 } });
  });

  it('claims fencing: a claim drop that fails once neither fails the holder\'s renew nor locks it out of its lease', async () => {
    const store = createMongoStore({ db: t.db, collectionName: 'drop-fails', fencing: 'claims' });
    const k = key('drop-fails');
    const first = await store.begin(k, 'fp', 30_000);
    if (first.kind !== 'acquired') throw new Error('expected acquired');
    const deleteOne = store.claimsCollection.deleteOne.bind(store.claimsCollection);
    let failures = 0;
    store.claimsCollection.deleteOne = ((...args: Parameters<typeof deleteOne>) =>
      failures++ === 0 ? Promise.reject(new Error('connection reset')) : deleteOne(...args)) as typeof deleteOne;
    // The renew's write landed; only dropping its claim failed (a transient error).
    expect(await store.renew(k, first.token, 30_000)).toBe(true);
    expect(failures).toBe(1);
    // Its claim is still there, and it is the holder's own: the next operations go on.
    expect(await store.renew(k, first.token, 30_000)).toBe(true);
    expect(await store.complete(k, first.token, response(new Uint8Array([7])), 60_000)).toBe(true);
    expect((await store.get(k))?.state).toBe('completed');
  });

  // Was: the holder reused a claim its earlier renew had failed to drop, stamped then; takers
  // judge a claim by that stamp, so one walked past it while the holder's complete, checked just
  // before the lease ended, was on its way, and both wrote. The holder now goes by the same age
  // (replacing the leftover instead raced a taker that had read it).
  it("claims fencing: a holder whose leftover claim a taker may already walk past does not write (never both)", async () => {
    const [a, b] = await Promise.all([t.client(), t.client()]);
    const holder = createMongoStore({ db: a.db(t.dbName), collectionName: 'leftover', fencing: 'claims', clock: 'local' });
    const taker = createMongoStore({ db: b.db(t.dbName), collectionName: 'leftover', fencing: 'claims', clock: 'local' });
    const k = key('leftover');
    vi.useFakeTimers({ toFake: ['Date'] });
    try {
      const t0 = Date.now();
      const first = await holder.begin(k, 'fp', 30_000);
      if (first.kind !== 'acquired') throw new Error('expected acquired');
      const deleteOne = holder.claimsCollection.deleteOne.bind(holder.claimsCollection);
      let failures = 0;
      holder.claimsCollection.deleteOne = ((...args: Parameters<typeof deleteOne>) =>
        failures++ === 0 ? Promise.reject(new Error('connection reset')) : deleteOne(...args)) as typeof deleteOne;
      expect(await holder.renew(k, first.token, 20_000)).toBe(true); // its claim, stamped t0, stays
      // Just before the lease ends the holder completes. Its claim is 19.9 s old: a taker may walk
      // past it as soon as the lease ends (takers go by the claim's age), and the write could land
      // after that taker's. Before, the holder wrote, and a slow write overwrote the taker's record.
      vi.setSystemTime(t0 + 19_900);
      expect(await holder.complete(k, first.token, response(new Uint8Array([1])), 60_000)).toBe(false);
      vi.setSystemTime(t0 + 20_100);
      expect(await taker.begin(k, 'taker', 30_000)).toMatchObject({ kind: 'acquired', tookOver: true });
      expect(await taker.get(k)).toMatchObject({ state: 'in_progress', fingerprint: 'taker' });
    } finally {
      vi.useRealTimers();
    }
  });

  it('an expired completed record counts as absent and is replaced (tookOver: false)', async () => {
    const store = createMongoStore({ db: t.db });
    const k = key('expired-completed');
    const first = await store.begin(k, 'fp', 30_000);
    if (first.kind !== 'acquired') throw new Error('expected acquired');
    expect(await store.complete(k, first.token, response(new Uint8Array([9])), 50)).toBe(true);
    await vi.waitFor(async () => expect(await store.get(k)).toBeUndefined(), { timeout: 5_000, interval: 20 });
    const second = await store.begin(k, 'other', 30_000);
    expect(second).toMatchObject({ kind: 'acquired', tookOver: false });
    expect((await store.get(k))?.fingerprint).toBe('other');
  });
});

describe('ttlMs through the engine', () => {
  it('through the engine, `ttlMs: Infinity` and `Number.MAX_SAFE_INTEGER` ("forever") keep the answer: the retry replays it, no second run', async () => {
    const store = createMongoStore({ db: t.db });
    for (const ttlMs of [Number.POSITIVE_INFINITY, Number.MAX_SAFE_INTEGER]) {
      const engine = createIdempotencyEngine({ store, logger: false, ttlMs });
      const k = key('forever');
      const request = { method: 'POST', path: '/charges', headers: { 'idempotency-key': k }, body: { amount: 300 } };
      const first = await engine.decide(request);
      if (first.kind !== 'run') throw new Error(`expected run, got ${first.kind}`);
      expect(await first.lease.commit(response(new Uint8Array([7])))).toBe(true);
      // Before the cap, `now + ttlMs` was past a Date's end: stored as 1970, expired when written,
      // so this retry ran the handler again.
      const retry = await engine.decide(request);
      expect(retry.kind).toBe('replay');
      const expiresAt = (await store.get(scopedKey(undefined, k)))?.expiresAt ?? 0;
      expect(new Date(expiresAt).getUTCFullYear()).toBeGreaterThan(new Date().getUTCFullYear() + 98);
    }
  });
});

describe("native fencing's conditional writes (run one at a time, so any server can check them)", () => {
  it('complete, renew, release and takeover obey token, state and lease end', async () => {
    const store = createMongoStore({ db: t.db, collectionName: 'native', fencing: 'native' });
    expect(await store.fencing()).toBe('native');
    const k = key('native');
    const first = await store.begin(k, 'fp', 30_000);
    if (first.kind !== 'acquired') throw new Error('expected acquired');
    const wrong = 'not-the-token' as LeaseToken;
    expect(await store.renew(k, wrong, 60_000)).toBe(false);
    expect(await store.complete(k, wrong, response(new Uint8Array([1])), 60_000)).toBe(false);
    expect(await store.release(k, wrong)).toBe(false);
    expect(await store.renew(k, first.token, 60_000)).toBe(true);
    expect(await store.release(k, first.token)).toBe(true);
    expect(await store.get(k)).toBeUndefined();

    const second = await store.begin(k, 'fp', 50);
    if (second.kind !== 'acquired') throw new Error('expected acquired');
    expect(second.tookOver).toBe(false);
    await vi.waitFor(async () => expect(await store.get(k)).toBeUndefined(), { interval: 10 });
    expect(await store.renew(k, second.token, 60_000)).toBe(false);
    const third = await store.begin(k, 'fp', 30_000);
    expect(third).toMatchObject({ kind: 'acquired', tookOver: true });
    if (third.kind !== 'acquired') throw new Error('expected acquired');
    expect(await store.complete(k, second.token, response(new Uint8Array([2])), 60_000)).toBe(false);
    expect(await store.complete(k, third.token, response(new Uint8Array([3])), 60_000)).toBe(true);
    expect(await store.complete(k, third.token, response(new Uint8Array([4])), 60_000)).toBe(false);
    expect(await store.release(k, third.token)).toBe(false);
    const replay = await store.begin(k, 'fp', 30_000);
    expect(replay.kind === 'existing' && replay.record.response?.body).toEqual(new Uint8Array([3]));
    expect(replay).toMatchObject({ kind: 'existing', leaseRemainingMs: 0 });
    expect(await store.claimsCollection.countDocuments({})).toBe(0);
  });
});

describe('keys are plain strings, never operators', () => {
  const tricky = ['{"$gt":""}', '$where', 'a.b', '$', '$ne', '{"$ne":null}', 'this.a == 1', '.', '$$NOW', 'x\u00e9'];
  it.each(tricky)('%s is stored and matched literally', async (raw) => {
    const store = createMongoStore({ db: t.db, collectionName: 'tricky' });
    await store.collection.insertOne({
      _id: `${raw}-decoy`,
      fingerprint: null,
      state: 'in_progress',
      token: 'decoy' as LeaseToken,
      leaseExpiresAt: new Date(Date.now() + 3_600_000),
      response: null,
      createdAt: new Date(),
      expiresAt: new Date(Date.now() + 3_600_000),
    });
    expect(await store.get(raw)).toBeUndefined();
    const begun = await store.begin(raw, 'fp', 30_000);
    expect(begun.kind).toBe('acquired');
    const again = await store.begin(raw, 'fp', 30_000);
    expect(again.kind).toBe('existing');
    const doc = await store.collection.findOne({ _id: { $eq: raw } });
    expect(doc?._id).toBe(raw);
    expect(typeof doc?._id).toBe('string');
    expect((await store.get(raw))?.key).toBe(raw);
    if (begun.kind === 'acquired') expect(await store.release(raw, begun.token)).toBe(true);
    expect((await store.get(`${raw}-decoy`))?.state).toBe('in_progress');
  });

  it('refuses a non-string key from an untyped caller instead of sending an operator object', async () => {
    const store = createMongoStore({ db: t.db });
    const operator = { $gt: '' } as unknown as string;
    await expect(store.get(operator)).rejects.toThrow(TypeError);
    await expect(store.begin(operator, null, 1_000)).rejects.toThrow(TypeError);
    await expect(store.complete('k', operator as LeaseToken, response(new Uint8Array()), 1_000)).rejects.toThrow(TypeError);
    await expect(store.release('k', { $ne: null } as unknown as LeaseToken)).rejects.toThrow(TypeError);
  });
});

describe('bodies', () => {
  it('round-trips binary bodies byte for byte', async () => {
    const store = createMongoStore({ db: t.db });
    const every = Uint8Array.from({ length: 256 }, (_, i) => i);
    const big = new Uint8Array(1024 * 1024);
    for (let i = 0; i < big.length; i += 65_536) crypto.getRandomValues(big.subarray(i, i + 65_536));
    const invalidUtf8 = new Uint8Array([0xff, 0xfe, 0x00, 0xc3, 0x28, 0xed, 0xa0, 0x80]);
    for (const body of [new Uint8Array(0), every, invalidUtf8, big]) {
      const k = key('bytes');
      const begun = await store.begin(k, null, 30_000);
      if (begun.kind !== 'acquired') throw new Error('expected acquired');
      const expected = Uint8Array.from(body);
      const sent = response(body, 200);
      expect(await store.complete(k, begun.token, sent, 60_000)).toBe(true);
      body.fill(7); // the stored copy must not follow later changes of the caller's buffer
      const replay = await store.begin(k, null, 30_000);
      if (replay.kind !== 'existing' || replay.record.response === null) throw new Error('expected a stored response');
      const got = replay.record.response;
      expect(got.body).toBeInstanceOf(Uint8Array);
      expect(got.body.length).toBe(expected.length);
      expect(Buffer.compare(Buffer.from(got.body), Buffer.from(expected))).toBe(0);
      expect((await store.get(k))?.response?.body).toEqual(expected);
      expect(got.status).toBe(200);
      expect(got.headers).toEqual(sent.headers);
      expect(replay.record.fingerprint).toBeNull();
    }
  });
});

describe('the 16 MiB document limit', () => {
  it('keeps a body of maxResponseBytes, and the engine refuses a larger maxBodyBytes up front', async () => {
    // Its own collection, dropped at the end: FerretDB on SQLite slows every later scan of a
    // collection holding a 15 MiB document.
    const store = createMongoStore({ db: t.db, collectionName: 'idempotency_limit' });
    onTestFinished(() => store.collection.drop().then(() => undefined));
    expect(store.maxResponseBytes).toBe(15 * 1024 * 1024);
    const k = key('limit');
    const begun = await store.begin(k, 'sha256:' + 'f'.repeat(43), 30_000);
    if (begun.kind !== 'acquired') throw new Error('expected acquired');
    const body = new Uint8Array(store.maxResponseBytes as number).fill(0x61);
    expect(await store.complete(k, begun.token, response(body), 60_000)).toBe(true);
    expect((await store.get(k))?.response?.body.byteLength).toBe(body.byteLength);
    // Before, maxBodyBytes above the limit was accepted: a 17 MiB answer then failed to store
    // (the driver cannot encode the document) and its retries ran the handler again.
    expect(() => createIdempotencyEngine({ store, maxBodyBytes: 20 * 1024 * 1024 })).toThrow(ConfigurationError);
    expect(() => createIdempotencyEngine({ store, maxBodyBytes: 20 * 1024 * 1024 })).toThrow(/more than this store can keep in one record \(15728640 bytes\)/);
    expect(createIdempotencyEngine({ store, maxBodyBytes: store.maxResponseBytes }).options.maxBodyBytes).toBe(15 * 1024 * 1024);
  });
});

describe('an answer whose body fits maxResponseBytes but whose record would not fit 16 MiB (large headers)', () => {
  const bigHeaders: Array<[string, string]> = [['content-type', 'application/octet-stream'], ['x-trace', 'h'.repeat(1_200_000)]];

  it('complete rejects with a clear error before writing anything: the record stays in progress, no claim is left, the holder can release it', async () => {
    const store = createMongoStore({ db: t.db, collectionName: 'idempotency_limit_headers' });
    onTestFinished(() => Promise.all([store.collection.drop(), store.claimsCollection.drop().catch(() => undefined)]).then(() => undefined));
    const k = key('limit-headers');
    const begun = await store.begin(k, 'fp', 30_000);
    if (begun.kind !== 'acquired') throw new Error('expected acquired');
    const body = new Uint8Array(store.maxResponseBytes as number).fill(0x61);
    // Before: FerretDB kept a ~16.9 MiB document (MongoDB refuses it with a bare BSONObjectTooLarge).
    await expect(store.complete(k, begun.token, { status: 201, headers: bigHeaders, body }, 60_000)).rejects.toThrow(/over MongoDB's 16 MiB document limit/);
    expect((await store.get(k))?.state).toBe('in_progress');
    expect(await store.claimsCollection.countDocuments({ _id: { $regex: `^\\["${k}"` } })).toBe(0);
    expect(await store.release(k, begun.token)).toBe(true);
    expect(await store.get(k)).toBeUndefined();
  }, 60_000);

  it('through the engine: the answer goes out, the key is not held (no 409), and retries get the 410 too-large marker, never a second run', async () => {
    const store = createMongoStore({ db: t.db, collectionName: 'idempotency_limit_engine' });
    onTestFinished(() => Promise.all([store.collection.drop(), store.claimsCollection.drop().catch(() => undefined)]).then(() => undefined));
    const engine = createIdempotencyEngine({ store, logger: false, maxBodyBytes: store.maxResponseBytes as number });
    const request = { method: 'POST', path: '/exports', headers: { 'idempotency-key': key('limit-engine') }, body: { month: 11 } };
    const first = await engine.decide(request);
    if (first.kind !== 'run') throw new Error(`expected run, got ${first.kind}`);
    const body = new Uint8Array((store.maxResponseBytes as number) - 1024).fill(0x62);
    // Before: the completion failed (or, on FerretDB, outlasted storeTimeoutMs) and was retried
    // for two leases, every retry of the key answered 409 meanwhile.
    expect(await first.lease.commit({ status: 201, headers: bigHeaders, body })).toBe(false);
    const retry = await engine.decide(request);
    expect(retry.kind).toBe('replay');
    if (retry.kind !== 'replay') return;
    expect(retry.response.status).toBe(410);
    expect(new TextDecoder().decode(retry.response.body)).toMatch(/too-large[\s\S]*body and headers were more than the store can keep in one record/);
  }, 60_000);
});

describe('a unique index of the user\'s on another field of the collection', () => {
  it('a duplicate on it is not taken for a race on the key: begin says which index is in the way, and races on one key still have one winner', async () => {
    const store = createMongoStore({ db: t.db, collectionName: 'idempotency_user_unique' });
    onTestFinished(() => store.collection.drop().then(() => undefined));
    await store.collection.createIndex({ fingerprint: 1 }, { unique: true, name: 'fingerprint_unique' });
    expect((await store.begin(key('user-unique'), 'fp-shared', 30_000)).kind).toBe('acquired');
    const started: string[] = [];
    const client = await t.client({ monitorCommands: true });
    client.on('commandStarted', (event: CommandStartedEvent) => started.push(event.commandName));
    const watched = createMongoStore({ db: client.db(t.dbName), collectionName: 'idempotency_user_unique', fencing: await store.fencing() });
    const release = vi.spyOn(watched, 'release');
    // Before: "begin lost 24 races in a row for one key", after 24 findAndModify round trips.
    const error = await watched.begin(key('user-unique'), 'fp-shared', 30_000).then(() => undefined, (e: unknown) => e);
    // Nothing landed, so no release is sent to give a claim back (the first goes out at once).
    expect(release).not.toHaveBeenCalled();
    expect(error).toBeInstanceOf(Error);
    expect((error as Error).message).toMatch(/refused by a unique index other than _id's on idempotency_user_unique/);
    expect((error as Error).cause).toMatchObject({ code: 11000 });
    expect(started.filter((name) => name === 'findAndModify').length).toBeLessThanOrEqual(2);
    const k = key('user-unique-race');
    const results = await Promise.all(Array.from({ length: 20 }, () => store.begin(k, `fp-${k}`, 30_000)));
    expect(results.filter((r) => r.kind === 'acquired')).toHaveLength(1);
    expect(results.filter((r) => r.kind === 'existing')).toHaveLength(19);
  });
});

describe('arguments the engine never sends, from a caller of the store itself', () => {
  let store: ReturnType<typeof createMongoStore>;
  beforeAll(() => {
    store = createMongoStore({ db: t.db, collectionName: 'idempotency_direct_calls' });
  });
  afterAll(() => Promise.all([store.collection.drop(), store.claimsCollection.drop()].map((p) => p.catch(() => undefined))).then(() => undefined));
  // Was: new Date(now + Infinity) is an Invalid Date, stored as 1970: complete() said true, the
  // answer was gone at once, and the next begin ran the handler again. Redis and Postgres refuse
  // such a TTL with a RangeError; so does this store now, before writing anything.
  it('refuses a ttlMs or leaseMs that is not a positive number of ms a Date can hold, and the record stays as it was', async () => {
    const k = key('bad-ms');
    const begun = await store.begin(k, 'fp', 30_000);
    if (begun.kind !== 'acquired') throw new Error('expected acquired');
    for (const ms of [Infinity, Number.MAX_SAFE_INTEGER, Number.NaN, 0, -1]) {
      await expect(store.complete(k, begun.token, response(new Uint8Array([1])), ms)).rejects.toThrow(/`ttlMs` must be a positive number of milliseconds/);
      await expect(store.renew(k, begun.token, ms)).rejects.toThrow(/`leaseMs` must be a positive number of milliseconds/);
      await expect(store.begin(key('bad-lease'), 'fp', ms)).rejects.toThrow(/`leaseMs` must be a positive number of milliseconds/);
    }
    expect((await store.get(k))?.state).toBe('in_progress');
    expect(await store.complete(k, begun.token, response(new Uint8Array([1])), 60_000)).toBe(true);
  });

  // Was: complete() threw at the call (Node's own message) where the other operations reject.
  it('rejects, never throws at the call, for a key that is not a string', async () => {
    let call: Promise<boolean> | undefined;
    expect(() => (call = store.complete(42 as unknown as string, 'token' as LeaseToken, response(new Uint8Array([1])), 60_000))).not.toThrow();
    await expect(call).rejects.toThrow(/key must be a string/);
  });

  // Was: 32 bytes counted per header, where BSON takes up to 34 besides name and value: 2 000
  // short headers and a body the count put at exactly 16 MiB wrote a record 2 KiB over it.
  it('counts each header fully against the 16 MiB limit', async () => {
    const k = key('many-headers');
    const begun = await store.begin(k, 'fp', 30_000);
    if (begun.kind !== 'acquired') throw new Error('expected acquired');
    const headers = Array.from({ length: 2_000 }, (): [string, string] => ['a', '']);
    const body = new Uint8Array(16 * 1024 * 1024 - (1024 + Buffer.byteLength(k) + 2_000 * 33));
    await expect(store.complete(k, begun.token, { status: 200, headers, body }, 60_000)).rejects.toThrow(/over MongoDB's 16 MiB document limit/);
    expect((await store.get(k))?.state).toBe('in_progress');
  }, 60_000);
});

describe('a key whose record others keep deleting (a cleanup script) while begins race on it', () => {
  // Was: FerretDB names no index in its duplicate-key errors, and a second such refusal with the
  // record already deleted again was taken for a unique index of the user's: begin failed (a
  // 503) telling the user to drop an index the collection does not have. Seen 18 times in 20 s.
  it('never blames a unique index the collection does not have', async () => {
    const collectionName = 'idempotency_churn';
    const store = createMongoStore({ db: t.db, collectionName, logger: false });
    onTestFinished(() => store.collection.drop().then(() => undefined));
    const client = await t.client({ maxPoolSize: 50 });
    const other = createMongoStore({ db: client.db(t.dbName), collectionName, logger: false });
    const raw = client.db(t.dbName).collection<{ _id: string }>(collectionName);
    const k = key('churn');
    const until = Date.now() + 6_000;
    const errors: string[] = [];
    let acquired = 0;
    const worker = async (s: typeof store): Promise<void> => {
      while (Date.now() < until) {
        try {
          if ((await s.begin(k, 'fp', 60_000)).kind === 'acquired') acquired++;
        } catch (error) {
          errors.push((error as Error).message);
        }
      }
    };
    const deleter = async (): Promise<void> => {
      while (Date.now() < until) await raw.deleteOne({ _id: k });
    };
    await Promise.all([...Array.from({ length: 40 }, (_, i) => worker(i % 2 === 0 ? store : other)), deleter(), deleter()]);
    expect(errors.filter((message) => message.includes('unique index'))).toEqual([]);
    expect(acquired).toBeGreaterThan(10);
    expect((await store.collection.indexes()).filter((index) => index.unique === true)).toEqual([]);
  }, 30_000);
});

describe('a Db from another copy of the driver (as Mongoose hands out)', () => {
  async function otherCopyDb(options: ConstructorParameters<typeof OtherCopyMongoClient>[1] = {}) {
    const client = new OtherCopyMongoClient(t.url, { serverSelectionTimeoutMS: 5_000, ...options });
    await client.connect();
    // The types of two driver copies differ as Mongoose's do; at run time they are what users pass.
    return { db: client.db(t.dbName) as unknown as Db, close: () => client.close() };
  }

  it('concurrent begins on one key: one winner, the others see it (never a store error)', async () => {
    const other = await otherCopyDb();
    try {
      const store = createMongoStore({ db: other.db });
      for (let round = 0; round < 5; round++) {
        const k = key('other-copy-race');
        // Before, its duplicate-key errors were not `instanceof` our MongoServerError: some
        // losers failed with E11000 (a 503 over HTTP) instead of seeing the winner.
        const results = await Promise.all(Array.from({ length: 40 }, () => store.begin(k, 'fp', 30_000)));
        expect(results.filter((r) => r.kind === 'acquired')).toHaveLength(1);
        expect(results.filter((r) => r.kind === 'existing')).toHaveLength(39);
      }
    } finally {
      await other.close();
    }
  });

  it('stores and replays bodies byte for byte, also with promoteBuffers', async () => {
    for (const options of [{}, { promoteBuffers: true }]) {
      const other = await otherCopyDb(options);
      try {
        const store = createMongoStore({ db: other.db });
        const k = key('other-copy-body');
        const begun = await store.begin(k, null, 30_000);
        if (begun.kind !== 'acquired') throw new Error('expected acquired');
        const body = Uint8Array.from({ length: 256 }, (_, i) => i);
        expect(await store.complete(k, begun.token, response(body), 60_000)).toBe(true);
        const replay = await store.begin(k, null, 30_000);
        if (replay.kind !== 'existing') throw new Error('expected a stored response');
        expect(replay.record.response?.body).toEqual(body);
      } finally {
        await other.close();
      }
    }
  });
});

describe('round trips per operation', () => {
  async function counted(options: { fencing: 'native' | 'claims' | 'auto'; clock?: 'server' | 'local' }) {
    const client = await t.client({ monitorCommands: true });
    const commands: string[] = [];
    client.on('commandStarted', (e: CommandStartedEvent) => commands.push(e.commandName));
    const store = createMongoStore({ db: client.db(t.dbName), logger: silent, ...options });
    const count = async <T>(run: () => Promise<T>): Promise<[T, string[]]> => {
      commands.length = 0;
      const value = await run();
      return [value, [...commands]];
    };
    return { store, count };
  }

  it("native fencing (MongoDB): one command per operation; begin + complete = 2 on a new key, 1 on a replay", async () => {
    const { store, count } = await counted({ fencing: 'native' });
    // The first operation also measures the server clock (two `hello`s, the shorter round trip
    // kept, since the first may open a connection; then cached).
    const [, warm] = await count(() => store.get(key('warm')));
    expect(warm).toEqual(['hello', 'hello', 'find']);

    const k = key('rtt');
    const [begun, c1] = await count(() => store.begin(k, 'fp', 30_000));
    expect(c1).toEqual(['findAndModify']);
    if (begun.kind !== 'acquired') throw new Error('expected acquired');
    const [, c2] = await count(() => store.renew(k, begun.token, 30_000));
    expect(c2).toEqual(['update']);
    const [, c3] = await count(() => store.complete(k, begun.token, response(new Uint8Array([1])), 60_000));
    expect(c3).toEqual(['update']);
    const [replay, c4] = await count(() => store.begin(k, 'fp', 30_000));
    expect(replay.kind).toBe('existing');
    expect(c4).toEqual(['findAndModify']);
    const [, c5] = await count(() => store.get(k));
    expect(c5).toEqual(['find']);

    const k2 = key('rtt-release');
    const b2 = await store.begin(k2, null, 30_000);
    if (b2.kind !== 'acquired') throw new Error('expected acquired');
    const [released, c6] = await count(() => store.release(k2, b2.token));
    expect(released).toBe(true);
    expect(c6).toEqual(['delete']);

    // Only an expired record costs a second command: the conditional replace.
    const k3 = key('rtt-expired');
    await store.begin(k3, null, 1);
    await vi.waitFor(async () => expect(await store.get(k3)).toBeUndefined(), { interval: 10 });
    const [took, c7] = await count(() => store.begin(k3, null, 30_000));
    expect(took).toMatchObject({ kind: 'acquired', tookOver: true });
    expect(c7).toEqual(['findAndModify', 'update']);
  });

  it('claims fencing (FerretDB): begin stays one command; lease-ending writes add a claim', async () => {
    const { store, count } = await counted({ fencing: 'auto' });
    // The first operation asks buildInfo (which fencing) and hello (server clock) in parallel.
    const [, warm] = await count(() => store.begin(key('warm'), null, 1_000));
    expect([...warm].sort()).toEqual(['buildInfo', 'findAndModify', 'hello', 'hello']);
    const fencing = await store.fencing();
    expect(fencing).toBe((await t.isFerretDB()) ? 'claims' : 'native');
    // On a real MongoDB 'auto' picks native fencing: claims are then asked for, never skipped.
    const claims = fencing === 'claims' ? { store, count } : await counted({ fencing: 'claims' });
    if (claims.store !== store) await claims.store.begin(key('warm-claims'), null, 1_000);

    const k = key('rtt-claims');
    const [begun, c1] = await claims.count(() => claims.store.begin(k, 'fp', 30_000));
    expect(c1).toEqual(['findAndModify']);
    if (begun.kind !== 'acquired') throw new Error('expected acquired');
    const [, c2] = await claims.count(() => claims.store.renew(k, begun.token, 30_000));
    expect(c2).toEqual(['insert', 'find', 'update', 'delete']);
    const [, c3] = await claims.count(() => claims.store.complete(k, begun.token, response(new Uint8Array([1])), 60_000));
    expect(c3).toEqual(['insert', 'find', 'update']);
    const [, c4] = await claims.count(() => claims.store.begin(k, 'fp', 30_000));
    expect(c4).toEqual(['findAndModify']);
  });

  // Was: get() sent { _id, expiresAt: { $gt: now } }, which FerretDB v1 answers by reading every
  // document of the collection: 2.6 s per get() beside twenty 1 MiB responses (0.1 s by _id),
  // past the engine's storeTimeoutMs with a few more.
  it('get() finds by `_id` alone and checks expiry itself (FerretDB v1 scans the collection for any other filter)', async () => {
    const client = await t.client({ monitorCommands: true });
    const filters: unknown[] = [];
    client.on('commandStarted', (e: CommandStartedEvent) => {
      if (e.commandName === 'find' && e.command['find'] === 'get-by-id') filters.push(e.command['filter']);
    });
    const store = createMongoStore({ db: client.db(t.dbName), collectionName: 'get-by-id', logger: silent });
    const expiring = key('get-expiring');
    expect((await store.begin(expiring, 'fp', 50)).kind).toBe('acquired');
    await vi.waitFor(async () => expect(await store.get(expiring)).toBeUndefined(), { timeout: 5_000, interval: 20 });
    const live = key('get-live');
    expect((await store.begin(live, 'fp', 30_000)).kind).toBe('acquired');
    expect(await store.get(live)).toMatchObject({ key: live, state: 'in_progress', fingerprint: 'fp' });
    expect(await store.get(key('get-absent'))).toBeUndefined();
    expect(filters.length).toBeGreaterThanOrEqual(3);
    for (const filter of filters) expect(Object.keys(filter as object)).toEqual(['_id']);
  });

  it("clock: 'local' never asks the server for its time", async () => {
    const client = await t.client({ monitorCommands: true });
    const commands: string[] = [];
    client.on('commandStarted', (e: CommandStartedEvent) => commands.push(e.commandName));
    const store = createMongoStore({ db: client.db(t.dbName), clock: 'local' });
    await store.get(key('local'));
    expect(commands).toEqual(['find']);
  });
});

describe('server clock', () => {
  const serverTime = async (): Promise<number> => ((await t.db.admin().command({ hello: 1 })) as { localTime: Date }).localTime.getTime();
  /** Begins a new key through a fresh store; the server's time just before and just after. */
  async function stamp(label: string) {
    const store = createMongoStore({ db: t.db });
    const before = await serverTime();
    const k = key(label);
    await store.begin(k, null, 10_000);
    const after = await serverTime();
    return { before, after, record: await store.get(k) };
  }

  it("stamps records with the server's time (hello.localTime), within the round trip", async () => {
    const { before, after, record } = await stamp('clock');
    // ± the measuring round trip on a local server: a few ms.
    expect(record?.createdAt).toBeGreaterThanOrEqual(before - 50);
    expect(record?.createdAt).toBeLessThanOrEqual(after + 50);
    expect(record?.expiresAt).toBe((record?.createdAt ?? 0) + 10_000);
    expect(record?.leaseExpiresAt).toBe(record?.expiresAt);
  });

  it("an app server whose clock runs 60 s fast still stamps the server's time (the offset cancels the skew)", async () => {
    const realNow = Date.now.bind(Date);
    const skewed = vi.spyOn(Date, 'now').mockImplementation(() => realNow() + 60_000);
    onTestFinished(() => skewed.mockRestore());
    const { before, after, record } = await stamp('clock-skew');
    expect(record?.createdAt).toBeGreaterThanOrEqual(before - 50);
    expect(record?.createdAt).toBeLessThanOrEqual(after + 50);
  });

  // Was: the offset was kept to Date.now(), so a wall clock stepped back 90 s after the sync
  // wrote leases that had ended 60 s before (another process took over at once and the handler
  // ran twice), and one stepped forward wrote leases 90 s too long. A monotonic clock, which
  // stops while the machine sleeps, needs a new sync after a suspend.
  it.each(['back', 'forward', 'suspend'])(
    'a process whose clock jumps 90 s (%s) after the sync still writes the lease asked for',
    async (mode) => {
      const k = key(`clock-${mode}`);
      const fixture = fileURLToPath(new URL('./fixtures/clock-jump.mjs', import.meta.url));
      const run = spawnSync(process.execPath, [fixture, t.url, t.dbName, k, mode], { encoding: 'utf8', timeout: 20_000 });
      expect({ status: run.status, stderr: run.stderr }).toEqual({ status: 0, stderr: '' });
      expect(JSON.parse(run.stdout)).toEqual({ kind: 'acquired' });
      // Another process (this one) sees the lease running, with about 30 s left.
      const other = await createMongoStore({ db: t.db, logger: silent }).begin(k, 'fp', 30_000);
      expect(other.kind).toBe('existing');
      const left = other.kind === 'existing' ? other.leaseRemainingMs : 0;
      expect(left).toBeGreaterThan(25_000);
      expect(left).toBeLessThanOrEqual(30_000);
    },
    30_000,
  );
});

describe('indexes and expiry', () => {
  it('ensureIndexes: a TTL index on MongoDB; on FerretDB one warning, a plain index, and the contract holds', async () => {
    const warnings: string[] = [];
    const store = createMongoStore({ db: t.db, collectionName: 'indexed', logger: { warn: (m: string) => warnings.push(m) } });
    const ferret = await t.isFerretDB();
    const first = await store.ensureIndexes();
    const second = await store.ensureIndexes();
    const indexes = await store.collection.indexes();
    if (ferret) {
      expect([first, second]).toEqual(['no-ttl', 'no-ttl']);
      expect(warnings).toHaveLength(1);
      expect(warnings[0]).toMatch(/refused a TTL index.*purgeExpired/s);
      expect(indexes.map((i) => i.name)).toContain(PLAIN_INDEX_NAME);
    } else {
      expect([first, second]).toEqual(['ttl', 'ttl']);
      expect(warnings).toHaveLength(0);
      expect(indexes.find((i) => i.name === TTL_INDEX_NAME)?.expireAfterSeconds).toBe(0);
    }
    // Expired records count as absent on read, and purgeExpired removes them.
    const k = key('indexed');
    const begun = await store.begin(k, null, 30_000);
    if (begun.kind !== 'acquired') throw new Error('expected acquired');
    await store.complete(k, begun.token, response(new Uint8Array([1])), 30);
    await vi.waitFor(async () => expect(await store.get(k)).toBeUndefined(), { interval: 10 });
    if (ferret) expect(await store.collection.countDocuments({ _id: { $eq: k } })).toBe(1);
    expect(await store.purgeExpired()).toBeLessThanOrEqual(1);
    expect(await store.collection.countDocuments({ _id: { $eq: k } })).toBe(0);
  });

  // Was: the driver's IndexOptionsConflict (85) or IndexKeySpecsConflict (86) came through raw,
  // and again at every boot, without saying which index was in the way or what to do about it.
  it('ensureIndexes: an index in the way is a ConfigurationError that names it and says what to do, at every boot', async () => {
    const ensure = (collectionName: string) =>
      createMongoStore({ db: t.db, collectionName, logger: silent })
        .ensureIndexes()
        .then(
          () => undefined,
          (error: unknown) => error,
        );
    // The same key under another name (the shell's default name).
    const sameKey = t.db.collection('clash-same-key');
    await sameKey.createIndex({ expiresAt: 1 }, { name: 'expiresAt_1' });
    for (let boot = 0; boot < 2; boot++) {
      const error = await ensure('clash-same-key');
      expect(error).toBeInstanceOf(ConfigurationError);
      expect(error).toMatchObject({ code: 'ERR_IDEMKIT_STORE_INDEX' });
      expect((error as Error).message).toMatch(
        /clash-same-key already has an index on expiresAt, "expiresAt_1" on \{"expiresAt":1\} \(no TTL\).*dropIndex\("expiresAt_1"\).*or keep it.*purgeExpired/s,
      );
    }
    // Doing as it says works.
    await sameKey.dropIndex('expiresAt_1');
    expect(await ensure('clash-same-key')).toBeUndefined();
    // The store's index name on another key.
    const ours = (await t.isFerretDB()) ? PLAIN_INDEX_NAME : TTL_INDEX_NAME;
    await t.db.collection('clash-same-name').createIndex({ expiresAt: -1 }, { name: ours });
    const error = await ensure('clash-same-name');
    expect(error).toBeInstanceOf(ConfigurationError);
    expect((error as Error).message).toMatch(
      new RegExp(`clash-same-name has an index "${ours}" on \\{"expiresAt":-1\\}.*dropIndex\\("${ours}"\\)`, 's'),
    );
  });

  // Was: FerretDB v1 answers ok to createIndex when an index of that name and key exists with
  // other options, and keeps the old one: ensureIndexes() resolved, and with a unique index on
  // expiresAt (someone's earlier attempt) every completion that met another record's expiry
  // instant failed (SQLite: UNIQUE constraint failed), each answered 409 until the engine gave
  // up on it. (MongoDB refuses such a createIndex itself, code 85.)
  it('ensureIndexes: an index of the store\'s name and key but other options (unique) is a ConfigurationError, not a silent boot', async () => {
    const ours = (await t.isFerretDB()) ? PLAIN_INDEX_NAME : TTL_INDEX_NAME;
    const collection = t.db.collection('clash-options');
    await collection.createIndex({ expiresAt: 1 }, { name: ours, unique: true });
    for (let boot = 0; boot < 2; boot++) {
      const error = await createMongoStore({ db: t.db, collectionName: 'clash-options', logger: silent })
        .ensureIndexes()
        .then(
          () => undefined,
          (e: unknown) => e,
        );
      expect(error).toBeInstanceOf(ConfigurationError);
      expect(error).toMatchObject({ code: 'ERR_IDEMKIT_STORE_INDEX' });
      expect((error as Error).message).toMatch(new RegExp(`"${ours}" on \\{"expiresAt":1\\} \\(.*unique.*\\).*dropIndex\\("${ours}"\\)`, 's'));
    }
    await collection.dropIndex(ours);
    const store = createMongoStore({ db: t.db, collectionName: 'clash-options', logger: silent });
    await store.ensureIndexes();
    expect((await collection.indexes()).find((i) => i.name === ours)?.unique).toBeUndefined();
  });

  it('purgeExpired deletes in batches of `limit` and spares live records', async () => {
    const store = createMongoStore({ db: t.db, collectionName: 'purge' });
    const past = new Date(Date.now() - 60_000);
    const future = new Date(Date.now() + 3_600_000);
    const doc = (id: string, expiresAt: Date): IdempotencyDocument => ({
      _id: id,
      fingerprint: null,
      state: 'completed',
      token: null,
      leaseExpiresAt: null,
      response: null,
      createdAt: past,
      expiresAt,
    });
    await store.collection.insertMany([
      ...Array.from({ length: 25 }, (_, i) => doc(`old-${i}`, past)),
      ...Array.from({ length: 5 }, (_, i) => doc(`live-${i}`, future)),
    ]);
    expect(await store.purgeExpired(10)).toBe(10);
    expect(await store.purgeExpired(10)).toBe(10);
    expect(await store.purgeExpired(10)).toBe(5);
    expect(await store.purgeExpired(10)).toBe(0);
    expect(await store.collection.countDocuments({})).toBe(5);
    await expect(store.purgeExpired(0)).rejects.toThrow(RangeError);
  });
});

describe("the Stable API in strict mode (Atlas's connection snippet)", () => {
  /** The commands of Stable API V1 (MongoDB's Stable API changelog); `buildInfo` is not one of them. */
  const STABLE_API_V1 = new Set([
    'abortTransaction', 'aggregate', 'authenticate', 'collMod', 'commitTransaction', 'count', 'create', 'createIndexes',
    'delete', 'drop', 'dropDatabase', 'dropIndexes', 'endSessions', 'explain', 'find', 'findAndModify', 'getMore',
    'hello', 'insert', 'killCursors', 'listCollections', 'listDatabases', 'listIndexes', 'ping', 'refreshSessions', 'update',
  ]);
  /**
   * What MongoDB (5.0 on) answers `buildInfo` from a client with `serverApi: { version: '1', strict:
   * true }`. FerretDB v1 ignores `apiStrict` and answers it, so this one refusal is made here.
   */
  const strictRefusal = () =>
    new MongoServerError({
      ok: 0,
      code: 323,
      codeName: 'APIStrictError',
      errmsg:
        'Provided apiStrict:true, but the command buildInfo is not in API Version 1. Information on supported ' +
        'commands and migrations in API Version 1 can be found at https://dochub.mongodb.org/core/manual-versioned-api',
    });

  /** A Db of the real server whose `buildInfo` fails with `refuse()` (while it returns an error); every other command goes to the server. */
  function refusingBuildInfo(refuse: () => Error | undefined): { db: Db; asked: () => number } {
    const db = t.db.client.db(t.dbName);
    let asked = 0;
    const guard = <C extends (cmd: Record<string, unknown>, ...rest: never[]) => Promise<unknown>>(command: C): C =>
      ((cmd: Record<string, unknown>, ...rest: never[]) => {
        if (Object.keys(cmd)[0]?.toLowerCase() !== 'buildinfo') return command(cmd, ...rest);
        asked++;
        const refusal = refuse();
        return refusal === undefined ? command(cmd, ...rest) : Promise.reject(refusal);
      }) as C;
    const admin = db.admin.bind(db);
    db.admin = () => {
      const a = admin();
      a.command = guard(a.command.bind(a) as never) as typeof a.command;
      return a;
    };
    db.command = guard(db.command.bind(db) as never) as typeof db.command;
    return { db, asked: () => asked };
  }

  /** One request through the engine: runs and stores on the first call, replays on the second. */
  async function request(store: ReturnType<typeof createMongoStore>, header: string) {
    const engine = createIdempotencyEngine({ store, logger: false });
    return engine.decide({ method: 'POST', path: '/charge', headers: { 'idempotency-key': header }, body: undefined });
  }

  /** Every operation of the store once, each checked. */
  async function exercise(store: ReturnType<typeof createMongoStore>, label: string): Promise<void> {
    const header = key(label);
    const first = await request(store, header);
    if (first.kind !== 'run') throw new Error(`expected run, got ${JSON.stringify(first)}`);
    expect(await first.lease.commit(response(new Uint8Array([1, 2, 3])))).toBe(true);
    const again = await request(store, header);
    expect(again).toMatchObject({ kind: 'replay', response: { status: 201 } });

    const k = key(`${label}-store`);
    const begun = await store.begin(k, 'fp', 30_000);
    if (begun.kind !== 'acquired') throw new Error('expected acquired');
    expect(await store.renew(k, begun.token, 30_000)).toBe(true);
    expect(await store.complete(k, begun.token, response(new Uint8Array([9])), 60_000)).toBe(true);
    expect((await store.get(k))?.state).toBe('completed');
    const released = key(`${label}-released`);
    const held = await store.begin(released, null, 30_000);
    if (held.kind !== 'acquired') throw new Error('expected acquired');
    expect(await store.release(released, held.token)).toBe(true);
    const lapsed = key(`${label}-lapsed`);
    expect((await store.begin(lapsed, null, 50)).kind).toBe('acquired');
    await vi.waitFor(async () => expect(await store.get(lapsed)).toBeUndefined(), { timeout: 5_000, interval: 20 });
    expect(await store.begin(lapsed, null, 30_000)).toMatchObject({ kind: 'acquired', tookOver: true });
    const expiring = key(`${label}-expiring`);
    expect((await store.begin(expiring, null, 50)).kind).toBe('acquired');
    await vi.waitFor(async () => expect(await store.get(expiring)).toBeUndefined(), { timeout: 5_000, interval: 20 });
    expect(await store.purgeExpired()).toBeGreaterThanOrEqual(1);
  }

  // Was: `fencing: 'auto'` asked `buildInfo`, which Stable API V1 does not have: MongoDB refuses
  // it (APIStrictError, 323) on a client made as Atlas's connection snippet makes it, and every
  // operation that waited for the answer failed with it, ensureIndexes() at boot and each request
  // after (a 503 on every request, or none of them idempotent with onStoreError: 'pass').
  it("a real MongoDB's refusal of `buildInfo` under apiStrict (323) means native fencing: the store boots and serves", async () => {
    const { db, asked } = refusingBuildInfo(strictRefusal);
    const store = createMongoStore({ db, collectionName: 'strict-refused', logger: silent });
    expect(await store.ensureIndexes()).toBe((await t.isFerretDB()) ? 'no-ttl' : 'ttl');
    expect(await store.fencing()).toBe('native');
    await exercise(store, 'strict-refused');
    // Asked once: the refusal is an answer, kept like any other.
    expect(asked()).toBe(1);
  });

  it('any other failure of `buildInfo` still fails the operations waiting for it, and the next one asks again', async () => {
    // Only a server that enforces the Stable API answers 323; any other failure may be FerretDB's
    // (a blip), and FerretDB v1 must not get native fencing.
    let failures = 0;
    const { db, asked } = refusingBuildInfo(() =>
      failures++ === 0
        ? new MongoServerError({ ok: 0, code: 13, codeName: 'Unauthorized', errmsg: 'not authorized on admin to execute command { buildInfo: 1 }' })
        : undefined,
    );
    const store = createMongoStore({ db, collectionName: 'strict-other-failure', logger: silent });
    await expect(store.begin(key('other-failure'), null, 30_000)).rejects.toMatchObject({ code: 13 });
    expect(await store.begin(key('other-failure'), null, 30_000)).toMatchObject({ kind: 'acquired' });
    expect(await store.fencing()).toBe((await t.isFerretDB()) ? 'claims' : 'native');
    expect(asked()).toBe(2);
  });

  it("a client made as Atlas's snippet makes it (strict, deprecationErrors) works with the default options, and gets only Stable API V1 commands", async () => {
    const client = await t.client({
      serverApi: { version: ServerApiVersion.v1, strict: true, deprecationErrors: true },
      monitorCommands: true,
    });
    const sent: CommandStartedEvent[] = [];
    client.on('commandStarted', (e: CommandStartedEvent) => sent.push(e));
    const ferret = await t.isFerretDB();
    const store = createMongoStore({ db: client.db(t.dbName), collectionName: 'strict-client', logger: silent });
    expect(await store.ensureIndexes()).toBe(ferret ? 'no-ttl' : 'ttl');
    // FerretDB v1 answers `buildInfo` whatever the options, so it keeps claims fencing; MongoDB
    // refuses it (323), which the store takes as MongoDB.
    expect(await store.fencing()).toBe(ferret ? 'claims' : 'native');
    await exercise(store, 'strict-client');
    // The other fencing's writes too (one at a time, so any server can run them).
    const other = createMongoStore({
      db: client.db(t.dbName),
      collectionName: 'strict-client-other',
      fencing: ferret ? 'native' : 'claims',
      logger: silent,
    });
    await other.ensureIndexes();
    await exercise(other, 'strict-client-other');

    expect(sent.length).toBeGreaterThan(20);
    for (const e of sent) expect(e.command).toMatchObject({ apiVersion: '1', apiStrict: true, apiDeprecationErrors: true });
    const names = new Set(sent.map((e) => e.commandName));
    expect([...names].filter((name) => name !== 'buildInfo' && !STABLE_API_V1.has(name))).toEqual([]);
    expect([...sent.filter((e) => e.commandName === 'buildInfo')]).toHaveLength(1);
    // createIndexes under Stable API V1 refuses the index fields background, bucketSize, sparse
    // and storageEngine (and text indexes): the store sends none.
    for (const e of sent.filter((c) => c.commandName === 'createIndexes')) {
      for (const index of e.command['indexes'] as Array<Record<string, unknown>>) {
        expect(Object.keys(index).filter((field) => !['key', 'name', 'expireAfterSeconds'].includes(field))).toEqual([]);
      }
    }
  });
});

/** A client whose connections pass through a TCP hop the test controls; both are closed when the test ends. */
/** `onFinished`: a concurrent test's own `onTestFinished` (the global one does not track those). */
async function throughProxy(
  options?: MongoClientOptions,
  onFinished: typeof onTestFinished = onTestFinished,
): Promise<{ proxy: AnswerHoldingProxy; client: MongoClient }> {
  const target = new URL(t.url);
  const proxy = await answerHoldingProxy(target.hostname, Number(target.port || 27017));
  const client = new MongoClient(`mongodb://127.0.0.1:${proxy.port}/?directConnection=true`, options);
  onFinished(async () => {
    await client.close(true);
    await proxy.close();
  });
  return { proxy, client };
}

describe('failures', () => {
  it('a client closed mid-operation rejects with the driver error', async () => {
    const client = new MongoClient(t.url, { serverSelectionTimeoutMS: 2_000 });
    await client.connect();
    const store = createMongoStore({ db: client.db(t.dbName), clock: 'local' });
    await store.get(key('warm'));
    const pending = store.begin(key('closed'), null, 30_000);
    const closing = client.close();
    await expect(pending).rejects.toBeInstanceOf(MongoError);
    await closing;
    await expect(store.get(key('after-close'))).rejects.toBeInstanceOf(MongoError);
  });

  it('a claim whose answer was lost (a socket timeout) is given back: the caller saw a failure, so the key is free', async () => {
    const { proxy, client } = await throughProxy({
      // Well above a FerretDB round trip on a busy machine: the warm-up and the release below use it too.
      socketTimeoutMS: 2_000,
      retryWrites: false,
      serverSelectionTimeoutMS: 5_000,
    });
    await client.connect();
    const store = createMongoStore({ db: client.db(t.dbName), clock: 'local', logger: silent });
    const warm = key('warm');
    const claimed = await store.begin(warm, null, 30_000); // fencing mode known, connection warm
    if (claimed.kind === 'acquired') await store.release(warm, claimed.token);
    const k = key('lost-answer');
    proxy.holdAnswers(); // commands land, their answers never come back
    await expect(store.begin(k, 'fp', 60_000)).rejects.toBeInstanceOf(MongoError);
    // The upsert landed; the release went out on a new connection after it. Before, the claim
    // stayed for the whole lease and every retry got 409.
    const direct = createMongoStore({ db: t.db, clock: 'local', logger: silent });
    await vi.waitFor(async () => expect(await direct.get(k)).toBeUndefined(), { timeout: 8_000, interval: 50 });
    expect(await direct.begin(k, 'fp', 60_000)).toMatchObject({ kind: 'acquired', tookOver: false });
  });

  // Was: the first release failed in the outage that lost the claim's answer, nothing sent it
  // again, and the key answered 409 for the whole lease after the store was back.
  it('a lost claim whose first release fails too is released again once the server is reachable', async () => {
    const { proxy, client } = await throughProxy({
      socketTimeoutMS: 2_000,
      retryWrites: false,
      serverSelectionTimeoutMS: 2_000,
    });
    await client.connect();
    const store = createMongoStore({ db: client.db(t.dbName), clock: 'local', logger: silent });
    const warm = key('warm-2');
    const claimed = await store.begin(warm, null, 30_000);
    if (claimed.kind === 'acquired') await store.release(warm, claimed.token);
    const releases = vi.spyOn(store, 'release');
    const k = key('lost-answer-2');
    proxy.holdAnswers(); // the claim lands, its answer never comes back
    proxy.refuse(true); // and the release that follows cannot reach the server
    await expect(store.begin(k, 'fp', 60_000)).rejects.toBeInstanceOf(MongoError);
    await vi.waitFor(() => expect(releases).toHaveBeenCalledTimes(1), { timeout: 5_000, interval: 20 });
    await expect(releases.mock.results[0]?.value).rejects.toBeInstanceOf(MongoError);
    const direct = createMongoStore({ db: t.db, clock: 'local', logger: silent });
    expect(await direct.get(k)).toMatchObject({ state: 'in_progress' });
    proxy.refuse(false);
    await vi.waitFor(async () => expect(await direct.get(k)).toBeUndefined(), { timeout: 15_000, interval: 50 });
    expect(await direct.begin(k, 'fp', 60_000)).toMatchObject({ kind: 'acquired', tookOver: false });
    await store.close(); // no release is sent after this
  }, 30_000);

  // Was: every begin that failed during an outage sent token-fenced releases, at once and 250 ms,
  // 1 s and 3 s later (three commands each with claims fencing), also when no server could be
  // selected, so its upsert never left. On a standalone (FerretDB, a single mongod) the driver
  // retries no writes, so such a begin cannot have landed. At 200 calls a second through a 10 s
  // outage, those releases (8,000 commands) kept FerretDB busy for 15 s after it was back, and
  // the new requests meanwhile got 503 (the engine's storeTimeoutMs ran out in the queue).
  it('a begin that found no server on a standalone sends no releases: nothing left, so nothing to give back', async () => {
    const { proxy, client } = await throughProxy({ serverSelectionTimeoutMS: 1_000, heartbeatFrequencyMS: 500, monitorCommands: true });
    const store = createMongoStore({ db: client.db(t.dbName), logger: silent }); // clock 'server': its `hello` says standalone
    const warm = key('warm-3');
    const claimed = await store.begin(warm, null, 30_000);
    if (claimed.kind === 'acquired') await store.release(warm, claimed.token);
    const releases = vi.spyOn(store, 'release');
    const sent: string[] = [];
    client.on('commandStarted', (event: CommandStartedEvent) => sent.push(event.commandName));
    const gone = new Promise<void>((resolve) =>
      client.on('serverDescriptionChanged', (event: ServerDescriptionChangedEvent) => {
        if (event.newDescription.type === 'Unknown') resolve();
      }),
    );
    proxy.refuse(true); // the server goes away
    proxy.cut();
    await gone; // the driver knows: commands now wait for a server, and none is sent
    const keys = Array.from({ length: 20 }, () => key('no-server'));
    const failures = await Promise.all(keys.map((k) => store.begin(k, 'fp', 60_000).then(() => undefined, (error: unknown) => error)));
    for (const failure of failures) expect((failure as Error).name).toBe('MongoServerSelectionError');
    proxy.refuse(false); // back
    // Past the last of the give-back schedule (250 ms, 1 s, 3 s after the first send).
    await new Promise((resolve) => setTimeout(resolve, 4_500));
    expect(releases).not.toHaveBeenCalled();
    expect(sent.filter((name) => name !== 'hello')).toEqual([]);
    // The store serves again, and the keys are free.
    expect(await store.begin(keys[0]!, 'fp', 60_000)).toMatchObject({ kind: 'acquired', tookOver: false });
  }, 30_000);

  it('a begin refused a connection (the server process gone) on a standalone sends no releases either; one that may have gone out does', async () => {
    const { proxy, client } = await throughProxy({ serverSelectionTimeoutMS: 2_000 });
    const store = createMongoStore({ db: client.db(t.dbName), logger: silent });
    const warm = key('warm-4');
    const claimed = await store.begin(warm, null, 30_000);
    if (claimed.kind === 'acquired') await store.release(warm, claimed.token);
    const releases = vi.spyOn(store, 'release');
    await proxy.stopListening(); // open connections dropped, new ones refused (ECONNREFUSED)
    const keys = Array.from({ length: 20 }, () => key('refused'));
    const failures = await Promise.all(keys.map((k) => store.begin(k, 'fp', 60_000).then(() => undefined, (error: unknown) => error as Error)));
    // A command on a pooled connection that was dropped under it may have gone out: given back.
    // Refused connections, a cleared pool, no server: nothing left.
    const mayHaveLeft = (f: Error | undefined) =>
      f?.name === 'MongoNetworkError' && (f.cause as { code?: unknown } | undefined)?.code !== 'ECONNREFUSED';
    const neverLeft = keys.filter((_, i) => !mayHaveLeft(failures[i]));
    expect(failures.every((f) => f instanceof Error)).toBe(true);
    expect(neverLeft.length).toBeGreaterThan(0);
    await proxy.listen(); // back
    await new Promise((resolve) => setTimeout(resolve, 4_500)); // past the give-back schedule
    const released = new Set(releases.mock.calls.map(([k]) => k));
    expect(neverLeft.filter((k) => released.has(k))).toEqual([]);
    expect(keys.filter((k, i) => mayHaveLeft(failures[i]) && !released.has(k))).toEqual([]);
    expect(await store.begin(neverLeft[0]!, 'fp', 60_000)).toMatchObject({ kind: 'acquired', tookOver: false });
  }, 30_000);

  // Was: the first operations share one `buildInfo` (fencing: 'auto') and one `hello` (clock:
  // 'server'); sent on a connection gone silent (no socketTimeoutMS), they never answered, and
  // every later operation waited on them for good, after the network came back too.
  it('a shared first-use command unanswered for ASK_AGAIN_AFTER_MS is asked again by the next operation', async () => {
    // The README's plain client: no socketTimeoutMS, so nothing ends a command on a silent connection.
    const { proxy, client } = await throughProxy();
    await client.db(t.dbName).command({ ping: 1 }); // one pooled connection, idle
    const store = createMongoStore({ db: client.db(t.dbName), logger: silent }); // clock 'server', fencing 'auto'
    proxy.holdAnswers(); // that connection goes silent; new ones pass
    const first = store.begin(key('first-hung'), null, 30_000);
    first.catch(() => undefined); // in case the assertion below fails: the client is closed then
    // The rule is a time: an operation that comes after it asks again, on a connection that answers.
    await new Promise((resolve) => setTimeout(resolve, ASK_AGAIN_AFTER_MS + 200));
    expect(await store.begin(key('after'), null, 30_000)).toMatchObject({ kind: 'acquired' });
    expect(await store.fencing()).toBe('claims');
    // The operation that was waiting on the unanswered commands goes on with the new answers.
    expect(await first).toMatchObject({ kind: 'acquired' });
  }, 30_000);

  // Was (in this session's first fix, which timed the shared sync out): the stalled `hello`
  // answered late and its sample, whose round trip was the whole stall, replaced the offset of
  // the sync that had been asked again: the clock ran seconds ahead, and running leases looked
  // that much shorter (a takeover came early).
  it('a first-use `hello` answered late does not move the clock set by the one asked again', async () => {
    const { proxy, client } = await throughProxy();
    await client.db(t.dbName).command({ ping: 1 });
    const store = createMongoStore({ db: client.db(t.dbName), fencing: 'claims', logger: silent });
    proxy.stallAnswers(); // the pooled connection's answers wait until deliverHeld()
    const first = store.begin(key('late'), null, 30_000);
    await new Promise((resolve) => setTimeout(resolve, ASK_AGAIN_AFTER_MS + 200));
    const k = key('set-by-second');
    const created = Date.now();
    expect(await store.begin(k, null, 30_000)).toMatchObject({ kind: 'acquired' });
    // The first sync's first `hello` answers now, 5 s late; its second one is held 2 s as well,
    // so both its samples are far off (it keeps the shorter one).
    proxy.deliverHeld();
    proxy.stallAnswers();
    await new Promise((resolve) => setTimeout(resolve, 2_000));
    proxy.deliverHeld();
    expect(await first).toMatchObject({ kind: 'acquired' });
    // Had that sync set the clock, it would run about 1 s ahead, and the lease show that much less.
    const again = await store.begin(k, null, 30_000);
    const expected = 30_000 - (Date.now() - created);
    expect(again.kind).toBe('existing');
    expect(again.kind === 'existing' && Math.abs(again.leaseRemainingMs - expected)).toBeLessThan(400);
  }, 30_000);

  // Was: a refresh took one sample and used it whatever its round trip: an answer stalled 3 s
  // put the clock 1.5 s off, and running leases looked that much shorter or longer.
  it('a refresh whose answer comes seconds late does not move the clock', async () => {
    const { proxy, client } = await throughProxy();
    const store = createMongoStore({ db: client.db(t.dbName), fencing: 'claims', clockRefreshMs: 500, logger: silent });
    const k = key('leased');
    const created = Date.now();
    expect(await store.begin(k, null, 30_000)).toMatchObject({ kind: 'acquired' }); // the clock is set
    await new Promise((resolve) => setTimeout(resolve, 600)); // a refresh is due
    // Idle connections for the refresh and the operation below to take, all of them stalled.
    await Promise.all(Array.from({ length: 4 }, () => client.db(t.dbName).command({ ping: 1 })));
    proxy.stallAnswers(); // the refresh's answer (and this operation's) arrive 3 s late
    const meanwhile = store.begin(key('meanwhile'), null, 30_000);
    await new Promise((resolve) => setTimeout(resolve, 3_000));
    proxy.deliverHeld();
    expect(await meanwhile).toMatchObject({ kind: 'acquired' });
    const again = await store.begin(k, null, 30_000);
    const expected = 30_000 - (Date.now() - created);
    expect(again.kind).toBe('existing');
    expect(again.kind === 'existing' && Math.abs(again.leaseRemainingMs - expected)).toBeLessThan(400);
  }, 30_000);

  it('close() never closes the caller-owned client and is safe twice', async () => {
    const client = await t.client();
    const store = createMongoStore({ db: client.db(t.dbName) });
    await store.close();
    await store.close();
    expect(await client.db(t.dbName).command({ ping: 1 })).toMatchObject({ ok: 1 });
  });
});
