import { ConfigurationError, TransactionEndedError, type LeaseToken, type StoreTransaction, type StoredResponse } from '@idemkit/core';
import type { PoolClient } from 'pg';
import { completeParams } from './params.js';
import { STILL_OURS } from './queries.js';

/**
 * One open transaction of transactional mode. The handler writes through `client`; `complete`
 * marks the record completed in the same transaction and commits, so business rows and the
 * stored response commit (or vanish) together. The client goes back to the pool on every path.
 * A handler that ends the transaction itself (COMMIT or ROLLBACK on `client`) breaks that: then
 * `complete` and `rollback` reject with `TransactionEndedError` once the client is back.
 */
export class PgTransaction implements StoreTransaction<PoolClient> {
  #state: 'open' | 'completing' | 'done' = 'open';
  /** Set when rollback() arrives while complete() runs (e.g. the engine's deadline fired). */
  #abort = false;
  #completing: Promise<boolean> | undefined;

  constructor(
    readonly client: PoolClient,
    private readonly completeSql: string,
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
    this.#completing = this.#complete(completeParams(key, token, response, ttlMs));
    return this.#completing;
  }

  async #complete(params: unknown[]): Promise<boolean> {
    let row: { ours: boolean; updated: number } | undefined;
    try {
      ({ rows: [row] } = await this.client.query<{ ours: boolean; updated: number }>(this.completeSql, params));
    } catch (error) {
      // E.g. the handler left the transaction aborted: undo it and report the driver error.
      await this.#end('ROLLBACK');
      throw error;
    }
    if (row?.ours !== true) {
      // Nothing was written; the ROLLBACK ends whatever the handler began after its COMMIT.
      await this.#end('ROLLBACK');
      throw new TransactionEndedError();
    }
    const updated = row.updated === 1;
    if (updated && !this.#abort) {
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
      await this.#completing?.catch(() => undefined);
      return;
    }
    const ours = await this.#stillOurs();
    await this.#end('ROLLBACK', true);
    if (!ours) throw new TransactionEndedError();
  }

  /**
   * Asked before a rollback (a thrown handler, a status that is not stored), where the engine
   * would free the key: a handler that committed its writes itself must not be run again.
   * A transaction the handler left aborted refuses the question, and is still ours.
   */
  async #stillOurs(): Promise<boolean> {
    try {
      const { rows } = await this.client.query<{ ours: boolean }>(STILL_OURS);
      return rows[0]?.ours === true;
    } catch {
      return true;
    }
  }

  /** Send COMMIT/ROLLBACK and give the client back; a client whose last command failed is destroyed. */
  async #end(command: 'COMMIT' | 'ROLLBACK', rethrow = false): Promise<void> {
    this.#state = 'done';
    try {
      await this.client.query(command);
    } catch (error) {
      this.client.removeListener('error', this.#onConnectionError);
      // The connection's state is unknown: destroy it rather than hand it to the next user.
      this.client.release(error instanceof Error ? error : true);
      if (rethrow) throw error;
      return;
    }
    this.client.removeListener('error', this.#onConnectionError);
    this.client.release();
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
