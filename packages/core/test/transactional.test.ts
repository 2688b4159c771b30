import { describe, expect, it } from 'vitest';
import { createIdempotencyEngine, createMemoryStore, type LeaseToken, type StoredResponse, type StoreTransaction, type TransactionalStore } from '../src/index.js';
import { request, response } from './helpers.js';

/**
 * The engine's side of transactional mode, over the memory store: a transaction here is a list
 * of pending writes that lands only on commit. (Postgres proves the real thing in its package.)
 */
function transactionalMemoryStore(log: string[], failBegin = false, now?: () => number) {
  const rows: string[] = [];
  const inner = createMemoryStore(now ? { now } : {});
  const store: TransactionalStore<{ insert(row: string): void }> = Object.assign(inner, {
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
    expect(log).toEqual(['begin-tx', 'rollback']);
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
});
