import { ConfigurationError, TransactionEndedError, type LeaseToken, type StoreTransaction, type StoredResponse } from '@idemkit/core';
import type { Pool, PoolClient, QueryResult } from 'pg';
import { completeParams } from './params.js';
import { FATE, rollbackAndAsk } from './queries.js';

/** `txid_status()`: what became of a transaction (PostgreSQL 10+). */
type Fate = 'in progress' | 'committed' | 'aborted';

/**
 * One open transaction of transactional mode. The handler writes through `client`; `complete`
 * marks the record completed in the same transaction and commits, so business rows and the
 * stored response commit (or vanish) together. The client goes back to the pool on every path.
 * A handler that commits the transaction itself (COMMIT on `client`) breaks that: `complete` and
 * `rollback` then reject with `TransactionEndedError`, once the client is back. One that rolled
 * it back committed nothing, which is reported like any completion that failed.
 */
export class PgTransaction implements StoreTransaction<PoolClient> {
  #state: 'open' | 'completing' | 'done' = 'open';
  /** Set when rollback() arrives while complete() runs (e.g. the engine's deadline fired). */
  #abort = false;
  #completing: Promise<boolean> | undefined;

  constructor(
    readonly client: PoolClient,
    private readonly pool: Pool,
    private readonly completeSql: string,
    /** Our transaction's id, digits only (from `txid_current()::text`). */
    private readonly xid: string,
  ) {
    client.on('error', this.#onConnectionError);
  }

  /**
   * pg-pool takes its own 'error' listener off a client while it is checked out. A connection
   * that dies while the handler works (pg_terminate_backend, `idle_in_transaction_session_timeout`,
   * a network cut) would then be an unhandled 'error' event, which ends the process. Nothing is
   * lost by listening: the next query on the client rejects with the driver's error, and `#end`
   * destroys the client.
   */
  readonly #onConnectionError = (): void => undefined;

  complete(key: string, token: LeaseToken, response: StoredResponse, ttlMs: number): Promise<boolean> {
    if (this.#state !== 'open') {
      return Promise.reject(new Error('[idemkit] [postgres] This transaction was already completed or rolled back.'));
    }
    this.#state = 'completing';
    this.#completing = this.#complete([...completeParams(key, token, response, ttlMs), this.xid]);
    return this.#completing;
  }

  async #complete(params: unknown[]): Promise<boolean> {
    let row: { ours: boolean; updated: number; fate: Fate } | undefined;
    try {
      ({ rows: [row] } = await this.client.query<{ ours: boolean; updated: number; fate: Fate }>(this.completeSql, params));
    } catch (error) {
      // E.g. the handler left the transaction aborted: undo it and report the driver error,
      // unless the handler had committed before that (then nothing may free the key).
      if ((await this.#rollbackAndAsk()) === 'committed') throw new TransactionEndedError();
      throw error;
    }
    if (row?.ours !== true) {
      // Not our transaction any more: nothing was written. The ROLLBACK ends whatever the
      // handler began after its own COMMIT or ROLLBACK.
      await this.#end('ROLLBACK');
      if (row?.fate === 'committed') throw new TransactionEndedError();
      throw new Error(
        '[idemkit] [postgres] The handler rolled back the transaction it was given (ROLLBACK on the transaction client), so nothing of it committed. Do not end that transaction yourself.',
      );
    }
    if (row.updated === 1 && !this.#abort) {
      // A failed COMMIT throws (after the client is released): the caller must not claim success.
      await this.#end('COMMIT', true);
      return true;
    }
    // The lease was lost (taken over, expired): the stale holder's writes must vanish.
    await this.#end('ROLLBACK', true);
    return false;
  }

  async rollback(): Promise<void> {
    if (this.#state === 'done') return;
    if (this.#state === 'completing') {
      // Never send ROLLBACK between complete's UPDATE and its COMMIT; ask complete to roll back.
      this.#abort = true;
      try {
        await this.#completing;
      } catch (error) {
        if (error instanceof TransactionEndedError) throw error;
      }
      return;
    }
    // The engine frees the key after this (a thrown handler, a status that is not stored): a
    // handler that committed its writes itself must not be run again.
    if ((await this.#rollbackAndAsk(true)) === 'committed') throw new TransactionEndedError();
  }

  /**
   * ROLLBACK, give the client back, and say what became of our transaction: `aborted` (by this
   * ROLLBACK, or already), or `committed` by the handler. Asked on the same connection, after the
   * ROLLBACK, so an aborted session cannot refuse the question; on another connection only when
   * ours died (the server then aborts what it held, unless the handler's COMMIT got there first).
   */
  async #rollbackAndAsk(rethrow = false): Promise<Fate | undefined> {
    this.#state = 'done';
    let fate: Fate | undefined;
    try {
      const results = (await this.client.query(rollbackAndAsk(this.xid))) as unknown as Array<QueryResult<{ fate: Fate }>>;
      fate = results[1]?.rows[0]?.fate;
    } catch (error) {
      this.#release(error);
      fate = await this.pool.query<{ fate: Fate }>(FATE, [this.xid]).then(
        ({ rows }) => rows[0]?.fate,
        () => undefined,
      );
      if (rethrow && fate !== 'committed') throw error;
      return fate;
    }
    this.#release();
    return fate;
  }

  /** Send COMMIT/ROLLBACK and give the client back; a client whose last command failed is destroyed. */
  async #end(command: 'COMMIT' | 'ROLLBACK', rethrow = false): Promise<void> {
    this.#state = 'done';
    try {
      await this.client.query(command);
    } catch (error) {
      this.#release(error);
      if (rethrow) throw error;
      return;
    }
    this.#release();
  }

  /** Back to the pool; after a failed command the connection's state is unknown, so it is destroyed. */
  #release(failure?: unknown): void {
    this.client.removeListener('error', this.#onConnectionError);
    if (failure === undefined) this.client.release();
    else this.client.release(failure instanceof Error ? failure : true);
  }
}

function isPoolClient(value: unknown): value is PoolClient {
  return (
    typeof value === 'object' &&
    value !== null &&
    typeof (value as Partial<PoolClient>).query === 'function' &&
    typeof (value as Partial<PoolClient>).release === 'function'
  );
}

/**
 * The `pg` client of the running handler's transaction, typed. Pass the idempotency context the
 * binding gives you (`req.idempotency`, `ctx.state.idempotency`, `request.idempotency`, or
 * `lease.context` with the engine). Throws when the engine does not run with
 * `transactional: true` and a Postgres store, so a misconfiguration cannot silently write
 * outside the transaction.
 *
 * @example
 * const tx = pgTransaction(req.idempotency);
 * await tx.query('INSERT INTO orders (id, total) VALUES ($1, $2)', [id, total]);
 */
export function pgTransaction(context: { readonly transaction: unknown } | null | undefined): PoolClient {
  const client = context?.transaction;
  if (!isPoolClient(client)) {
    throw new ConfigurationError(
      'ERR_IDEMKIT_NOT_TRANSACTIONAL',
      context == null
        ? '[postgres] pgTransaction() got no idempotency context: this request is not running under an idempotency key (method not covered, or no key with `required: false`).'
        : '[postgres] pgTransaction(): no transaction in this idempotency context. Enable `transactional: true` with a Postgres store (createPostgresStore).',
    );
  }
  return client;
}
