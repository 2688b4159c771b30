import { describe, expect, it, vi } from 'vitest';
import { createIdempotencyEngine, createMemoryStore, idempotent, MemoryStore, TransactionEndedError, type IdempotencyEngine, type IdempotencyEvent, type LeaseToken, type StoredResponse, type StoreTransaction, type TransactionalStore } from '../src/index.js';
import { request, response } from './helpers.js';

/**
 * The engine's side of transactional mode, over the memory store: a transaction here is a list
 * of pending writes that lands only on commit. (Postgres proves the real thing in its package.)
 */
function transactionalMemoryStore(log: string[], failBegin = false, now?: () => number) {
  const rows: string[] = [];
  const inner = createMemoryStore(now ? { now } : {});
  const release = inner.release.bind(inner);
  const store: TransactionalStore<{ insert(row: string): void }> = Object.assign(inner, {
    async release(key: string, token: LeaseToken) {
      log.push('release');
      return release(key, token);
    },
    async beginTransaction(): Promise<StoreTransaction<{ insert(row: string): void }>> {
      if (failBegin) throw new Error('no connection');
      const pending: string[] = [];
      log.push('begin-tx');
      return {
        client: { insert: (row: string) => pending.push(row) },
        async complete(key: string, token: LeaseToken, res: StoredResponse, ttlMs: number) {
          const ok = await inner.complete(key, token, res, ttlMs);
          log.push(ok ? 'commit' : 'rollback');
          if (ok) rows.push(...pending);
          return ok;
        },
        async rollback() {
          log.push('rollback');
        },
      };
    },
  });
  return { store, rows };
}

describe('transactional mode (engine side)', () => {
  it('hands the transaction client to the handler and commits writes with the response', async () => {
    const log: string[] = [];
    const { store, rows } = transactionalMemoryStore(log);
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    const d = await engine.decide(request({ key: 'tx1' }));
    if (d.kind !== 'run') throw new Error('expected run');
    (d.lease.context.transaction as { insert(row: string): void }).insert('order-1');
    expect(await d.lease.commit(response())).toBe(true);
    expect(rows).toEqual(['order-1']);
    expect((await engine.decide(request({ key: 'tx1' }))).kind).toBe('replay');
  });

  it('rolls back before releasing when the handler throws, so the retry starts clean', async () => {
    const log: string[] = [];
    const { store, rows } = transactionalMemoryStore(log);
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    const d = await engine.decide(request({ key: 'tx2' }));
    if (d.kind !== 'run') throw new Error('expected run');
    (d.lease.context.transaction as { insert(row: string): void }).insert('half-done');
    await d.lease.abandon('handler-threw');
    expect(log).toEqual(['begin-tx', 'rollback', 'release']);
    expect(rows).toEqual([]);
    expect((await engine.decide(request({ key: 'tx2' }))).kind).toBe('run');
  });

  it('frees the key and answers 503 when no transaction can be opened', async () => {
    const { store } = transactionalMemoryStore([], true);
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    const d = await engine.decide(request({ key: 'tx3' }));
    expect(d.kind === 'problem' && d.error.status).toBe(503);
    expect(await store.get('-:tx3')).toBeUndefined();
  });

  it.each(['completed', 'running', 'gone'] as const)(
    "a rolled-back answer is replaced (the winner's record is %s)",
    async (winnerState) => {
      let now = 0;
      const { store } = transactionalMemoryStore([], false, () => now);
      const engine = createIdempotencyEngine({ store, transactional: true, logger: false, leaseMs: 1_000 });
      const stalled = await engine.decide(request({ key: 'tx4' }));
      if (stalled.kind !== 'run') throw new Error('expected run');
      now = 2_000; // the stalled holder's lease ran out; the next request takes over
      const winner = await engine.decide(request({ key: 'tx4' }));
      if (winner.kind !== 'run') throw new Error('expected takeover');
      if (winnerState === 'completed') await winner.lease.commit(response(201, 'winner'));
      if (winnerState === 'gone') await winner.lease.abandon('handler-threw');

      expect(await stalled.lease.commit(response(201, 'mine'))).toBe(false);
      const replacement = stalled.lease.replacement;
      if (winnerState === 'completed') {
        expect(replacement?.status).toBe(201);
        expect(Buffer.from(replacement!.body).toString()).toBe('winner');
        expect(replacement?.headers).toContainEqual(['idempotent-replayed', 'true']);
      } else if (winnerState === 'running') {
        expect(replacement?.status).toBe(409);
        expect(replacement?.headers).toContainEqual(['retry-after', '1']);
        await winner.lease.abandon('client-gone');
      } else {
        expect(replacement?.status).toBe(503);
      }
    },
  );

  // Was: a `fingerprint: false` route whose work was rolled back got the job's result as its
  // own answer, when the job took over the key (both keyed by one event id).
  it("a rolled-back answer of a fingerprint: false route is a mismatch when a job took the key over, not the job's result", async () => {
    let now = 0;
    const { store } = transactionalMemoryStore([], false, () => now);
    const route = createIdempotencyEngine({ store, transactional: true, fingerprint: false, logger: false, leaseMs: 1_000 });
    const stalled = await route.decide(request({ key: 'evt_1' }));
    if (stalled.kind !== 'run') throw new Error('expected run');
    now = 2_000; // the stalled route's lease ran out; the job takes the key over
    const job = idempotent(async (e: { id: string }) => ({ processed: e.id }), { store, name: 'process-event', key: (e) => e.id, logger: false });
    expect(await job({ id: 'evt_1' })).toEqual({ processed: 'evt_1' });

    expect(await stalled.lease.commit(response(201, 'mine'))).toBe(false);
    expect(stalled.lease.replacement?.status).toBe(422);
    expect(Buffer.from(stalled.lease.replacement!.body).toString()).not.toContain('processed');
  });

  it('outside transactional mode the handler\'s answer is never replaced', async () => {
    let now = 0;
    const store = createMemoryStore({ now: () => now });
    const engine = createIdempotencyEngine({ store, logger: false, leaseMs: 1_000 });
    const stalled = await engine.decide(request({ key: 'plain' }));
    now = 2_000;
    const winner = await engine.decide(request({ key: 'plain' }));
    if (stalled.kind !== 'run' || winner.kind !== 'run') throw new Error('expected runs');
    await winner.lease.commit(response(201, 'winner'));
    expect(await stalled.lease.commit(response(201, 'mine'))).toBe(false);
    expect(stalled.lease.replacement).toBeNull();
  });

  describe('under the store deadline (storeTimeoutMs)', () => {
    /** A transactional store over the memory store, as a plain object so every call gets the deadline. */
    function slowTransactions(opts: { openTx: Promise<void>; rollback?: () => Promise<void>; release?: 'hang'; failComplete?: boolean }) {
      const inner = createMemoryStore();
      const log: string[] = [];
      const store: TransactionalStore<null> = {
        shared: false,
        begin: (key, fp, leaseMs) => inner.begin(key, fp, leaseMs),
        complete: (key, token, res, ttlMs) => inner.complete(key, token, res, ttlMs),
        release: (key, token) => (opts.release === 'hang' ? new Promise<boolean>(() => undefined) : inner.release(key, token)),
        renew: (key, token, leaseMs) => inner.renew(key, token, leaseMs),
        get: (key) => inner.get(key),
        purgeExpired: (limit) => inner.purgeExpired(limit),
        close: () => inner.close(),
        async beginTransaction() {
          await opts.openTx;
          log.push('opened');
          return {
            client: null,
            complete: async (key, token, res, ttlMs) => {
              if (opts.failComplete) throw new Error('connection lost during COMMIT');
              return inner.complete(key, token, res, ttlMs);
            },
            rollback: async () => {
              log.push('rollback');
              await opts.rollback?.();
            },
          };
        },
      };
      return { store, log, inner };
    }

    it('a transaction that opens after its deadline is rolled back, and the key is free again', async () => {
      let open!: () => void;
      const { store, log } = slowTransactions({ openTx: new Promise<void>((resolve) => (open = resolve)) });
      const engine = createIdempotencyEngine({ store, transactional: true, logger: false, storeTimeoutMs: 50 });
      const d = await engine.decide(request({ key: 'late-tx' }));
      expect(d.kind === 'problem' && d.error.status).toBe(503);
      expect(await store.get('-:late-tx')).toBeUndefined();
      // The pool hands the connection out after all: it must go back, not stay open in a transaction.
      open();
      await vi.waitFor(() => expect(log).toEqual(['opened', 'rollback']), { timeout: 2_000, interval: 5 });
    });

    it('the key release after a failed beginTransaction cannot hang the request', async () => {
      // Pool exhausted: no transaction opens and the release waits for a connection too.
      const { store } = slowTransactions({ openTx: new Promise<void>(() => undefined), release: 'hang' });
      const engine = createIdempotencyEngine({ store, transactional: true, logger: false, storeTimeoutMs: 50 });
      const d = await engine.decide(request({ key: 'no-pool' }));
      expect(d.kind === 'problem' && d.error.status).toBe(503);
    });

    it.each(['abandon', 'commit that fails'] as const)('a rollback that never answers cannot hang %s', async (how) => {
      const { store, log } = slowTransactions({
        openTx: Promise.resolve(),
        rollback: () => new Promise<void>(() => undefined),
        failComplete: how !== 'abandon',
      });
      const events: string[] = [];
      const engine = createIdempotencyEngine({
        store, transactional: true, logger: false, storeTimeoutMs: 50,
        onEvent: (e) => { if (e.type === 'store-error') events.push(e.operation); },
      });
      const d = await engine.decide(request({ key: `stuck-rollback-${how}` }));
      if (d.kind !== 'run') throw new Error('expected run');
      if (how === 'abandon') await d.lease.abandon('handler-threw');
      else expect(await d.lease.commit(response())).toBe(false);
      expect(log).toContain('rollback');
      expect(events).toContain('rollback');
    });
  });
});

/** A transaction the handler can end itself (`client.commitItself()`), as a pg client's COMMIT would. */
function endableTransactionStore() {
  const inner = createMemoryStore();
  const committed: string[] = [];
  let released = 0;
  const store: TransactionalStore<{ insert(row: string): void; commitItself(): void }> = Object.assign(inner, {
    async beginTransaction() {
      const pending: string[] = [];
      let ended = false;
      const done = (): void => void released++;
      return {
        client: {
          insert: (row: string) => pending.push(row),
          commitItself: () => {
            ended = true;
            committed.push(...pending.splice(0));
          },
        },
        async complete(key: string, token: LeaseToken, res: StoredResponse, ttlMs: number) {
          done();
          if (ended) throw new TransactionEndedError();
          const ok = await inner.complete(key, token, res, ttlMs);
          if (ok) committed.push(...pending);
          return ok;
        },
        async rollback() {
          done();
          if (ended) throw new TransactionEndedError();
        },
      };
    },
  });
  return { store, committed, released: () => released };
}

describe('a handler that ends its transaction itself (TransactionEndedError from the store)', () => {
  async function started(key: string) {
    const { store, committed, released } = endableTransactionStore();
    const error = vi.fn();
    const engine = createIdempotencyEngine({ store, transactional: true, logger: { warn: () => undefined, error } });
    const d = await engine.decide(request({ key }));
    if (d.kind !== 'run') throw new Error('expected run');
    const client = d.lease.context.transaction as { insert(row: string): void; commitItself(): void };
    client.insert('order');
    client.commitItself();
    return { engine, d, committed, released, error };
  }

  async function replayedProblem(engine: IdempotencyEngine, key: string) {
    const retry = await engine.decide(request({ key }));
    if (retry.kind !== 'replay') throw new Error(`expected replay, got ${retry.kind}`);
    return { status: retry.response.status, ...(JSON.parse(new TextDecoder().decode(retry.response.body)) as object) };
  }

  it('on commit: the answer goes out unreplaced, an error is logged, retries replay 410 transaction-ended', async () => {
    const { engine, d, committed, error } = await started('ended-commit');
    expect(await d.lease.commit(response(201))).toBe(false);
    expect(d.lease.replacement).toBeNull();
    expect(committed).toEqual(['order']);
    expect(error).toHaveBeenCalledWith(expect.stringContaining('ended the transaction it was given'));
    expect(await replayedProblem(engine, 'ended-commit')).toMatchObject({ status: 410, reason: 'transaction-ended', originalStatus: 201 });
  });

  it('on a throw: the key is not freed (no second run), retries replay 410 with originalStatus null', async () => {
    const { engine, d, released } = await started('ended-throw');
    await d.lease.abandon('handler-threw');
    expect(released()).toBe(1);
    expect(await replayedProblem(engine, 'ended-throw')).toMatchObject({ status: 410, reason: 'transaction-ended', originalStatus: null });
  });

  it('on a status that is not stored: the marker keeps the handler from running again', async () => {
    const { engine, d } = await started('ended-500');
    expect(await d.lease.commit(response(500))).toBe(false);
    expect(await replayedProblem(engine, 'ended-500')).toMatchObject({ status: 410, reason: 'transaction-ended', originalStatus: 500 });
  });
});

describe('a rollback that outlasts storeTimeoutMs: the key is settled once its outcome is known', () => {
  /** A store (a subclass, so calls run under the deadline) whose rollback the test settles. */
  class SlowRollbackStore extends MemoryStore {
    settle: { resolve(): void; reject(error: unknown): void } | undefined;
    async beginTransaction(): Promise<StoreTransaction<null>> {
      return {
        client: null,
        complete: () => Promise.reject(new Error('not used')),
        rollback: () =>
          new Promise<void>((resolve, reject) => {
            this.settle = { resolve, reject };
          }),
      };
    }
  }

  async function thrownAndStuck(key: string) {
    const store = new SlowRollbackStore();
    const engine = createIdempotencyEngine({ store: store as TransactionalStore, transactional: true, logger: false, storeTimeoutMs: 50 });
    const d = await engine.decide(request({ key }));
    if (d.kind !== 'run') throw new Error('expected run');
    // Returns once the deadline fired; the rollback is still running.
    await d.lease.abandon('handler-threw');
    expect(store.settle).toBeDefined();
    // Meanwhile the key is held: a retry must not run while the handler's COMMIT may yet land.
    expect((await engine.decide(request({ key }))).kind).toBe('problem');
    return { engine, store };
  }

  it('the rollback then finds the handler committed: retries get the 410 marker, never a second run', async () => {
    const { engine, store } = await thrownAndStuck('slow-ended');
    store.settle?.reject(new TransactionEndedError());
    await vi.waitFor(async () => {
      const retry = await engine.decide(request({ key: 'slow-ended' }));
      expect(retry.kind === 'replay' && retry.response.status).toBe(410);
    }, { timeout: 10_000 });
  });

  it('the rollback then succeeds: the key is freed and the retry runs', async () => {
    const { engine, store } = await thrownAndStuck('slow-ok');
    store.settle?.resolve();
    await vi.waitFor(async () => {
      const retry = await engine.decide(request({ key: 'slow-ok' }));
      if (retry.kind === 'run') await retry.lease.abandon('client-gone');
      expect(retry.kind).toBe('run');
    }, { timeout: 10_000 });
  });
});

describe('store errors are told apart by code, and an unknown outcome is said to be unknown', () => {
  it('a TransactionEndedError from another copy of core (same code, another class) still marks the key', async () => {
    const inner = createMemoryStore();
    const store: TransactionalStore<null> = Object.assign(inner, {
      async beginTransaction(): Promise<StoreTransaction<null>> {
        const foreign = Object.assign(new Error('[idemkit] ended elsewhere'), { code: 'ERR_IDEMKIT_TRANSACTION_ENDED' });
        return { client: null, complete: () => Promise.reject(foreign), rollback: () => Promise.reject(foreign) };
      },
    });
    const engine = createIdempotencyEngine({ store, transactional: true, logger: false });
    const d = await engine.decide(request({ key: 'foreign' }));
    if (d.kind !== 'run') throw new Error('expected run');
    expect(await d.lease.commit(response(201))).toBe(false);
    const retry = await engine.decide(request({ key: 'foreign' }));
    expect(retry.kind === 'replay' && retry.response.status).toBe(410);
  });

  it('a completion that outlasts storeTimeoutMs: the client is told the outcome is not known yet, and the key is settled by what it did', async () => {
    for (const outcome of ['committed', 'rolled back'] as const) {
      const key = `slow-complete-${outcome}`;
      let settle: (() => void) | undefined;
      class SlowCompleteStore extends MemoryStore {
        async beginTransaction(): Promise<StoreTransaction<null>> {
          return {
            client: null,
            complete: (k, token, res, ttlMs) =>
              new Promise<boolean>((resolve, reject) => {
                settle = () => (outcome === 'committed' ? resolve(super.complete(k, token, res, ttlMs)) : reject(new Error('COMMIT failed')));
              }),
            rollback: async () => undefined,
          };
        }
      }
      const store = new SlowCompleteStore();
      const engine = createIdempotencyEngine({ store: store as TransactionalStore, transactional: true, logger: false, storeTimeoutMs: 50 });
      const d = await engine.decide(request({ key }));
      if (d.kind !== 'run') throw new Error('expected run');
      expect(await d.lease.commit(response(201))).toBe(false);
      const told = JSON.parse(new TextDecoder().decode(d.lease.replacement?.body)) as { status: number; detail: string };
      expect(told.status).toBe(503);
      expect(told.detail).toContain('could not be confirmed in time');
      // Until it settles the key is held.
      expect((await engine.decide(request({ key }))).kind).toBe('problem');
      settle?.();
      await vi.waitFor(async () => {
        const retry = await engine.decide(request({ key }));
        if (retry.kind === 'run') await retry.lease.abandon('client-gone');
        expect(retry.kind).toBe(outcome === 'committed' ? 'replay' : 'run');
      }, { timeout: 10_000 });
    }
  });
});

describe('a late transactional completion is reported once, by what it did', () => {
  it('refused when it lands (the lease was lost): completed stored:false and lease-lost, and refused renewals meanwhile report nothing', async () => {
    let settle: ((ok: boolean) => void) | undefined;
    let renewals = 0;
    class RefusingStore extends MemoryStore {
      override async renew(): Promise<boolean> {
        renewals++;
        return false;
      }
      async beginTransaction(): Promise<StoreTransaction<null>> {
        return { client: null, complete: () => new Promise<boolean>((resolve) => (settle = resolve)), rollback: async () => undefined };
      }
    }
    const events: IdempotencyEvent[] = [];
    const engine = createIdempotencyEngine({
      store: new RefusingStore() as TransactionalStore,
      transactional: true,
      logger: false,
      storeTimeoutMs: 30,
      leaseMs: 90,
      onEvent: (e) => events.push(e),
    });
    const d = await engine.decide(request({ key: 'late-refused' }));
    if (d.kind !== 'run') throw new Error('expected run');
    expect(await d.lease.commit(response(201))).toBe(false);
    // Renewals go on while the outcome is pending, until the store refuses one.
    await vi.waitFor(() => expect(renewals).toBeGreaterThan(0), { timeout: 10_000 });
    settle?.(false);
    await vi.waitFor(() => expect(events).toContainEqual(expect.objectContaining({ type: 'completed', stored: false })), { timeout: 10_000 });
    expect(events.filter((e) => e.type === 'lease-lost')).toEqual([{ type: 'lease-lost', key: 'late-refused', operation: 'complete' }]);
    expect(renewals).toBe(1);
  });
});
