import { ConfigurationError, TransactionAbortedError, TransactionEndedError, type LeaseToken, type StoreTransaction, type StoredResponse } from '@idemkit/core';
import type { Pool, PoolClient, QueryConfig, QueryResult } from 'pg';
import { giveBack } from './checkout.js';
import { STORE_TYPES } from './pg-types.js';
import { completeParams } from './params.js';
import { DEFAULT_QUERY_TIMEOUT_MS } from './options.js';
import { askThenRollback, FATE, rollbackThenFate, TERMINATE_OURS } from './queries.js';

/** `txid_status()`: what became of a transaction (PostgreSQL 10+). */
type Fate = 'in progress' | 'committed' | 'aborted';

/**
 * Asking another connection what became of a transaction whose own connection died: until it is
 * no longer `in progress` (a COMMIT the server is still running, a backend not yet gone) and the
 * pool answers, with backoff, for up to about half a minute.
 */
const FATE_ATTEMPTS = 12;
const FATE_FIRST_WAIT_MS = 100;
const FATE_MAX_WAIT_MS = 4_000;

/**
 * One open transaction of transactional mode. The handler writes through `client`; `complete`
 * marks the record completed in the same transaction and commits, so business rows and the
 * stored response commit (or vanish) together. The client goes back to the pool on every path.
 *
 * A handler that ends the transaction itself (COMMIT or ROLLBACK on `client`) breaks that:
 * `complete` and `rollback` then reject with `TransactionEndedError` once the client is back.
 * After a ROLLBACK the handler may have written on in autocommit, so a rolled-back transaction
 * counts as ended too, except where the session is provably still in ours.
 */
export class PgTransaction implements StoreTransaction<PoolClient> {
  /** Set when rollback() arrives while complete() runs (e.g. the engine's deadline fired). */
  #abort = false;
  /** The complete() or rollback() that ends this transaction, once one has begun. */
  #ending: Promise<unknown> | undefined;
  /**
   * What the handler gets: the pool client, except that `release()` throws, and `query()` refuses
   * once the engine has begun to end the transaction. A handler's query after its answer (an
   * audit row, say) would otherwise run between the completion and the COMMIT (and, failing,
   * turn the COMMIT into a rollback), or after the client went back to the pool, inside the next
   * user's transaction.
   */
  readonly client: PoolClient;
  /** The server process of our connection, to end it if it outlives our side (see #fateElsewhere). */
  readonly #pid: number | undefined;

  constructor(
    /** The pool client itself: the store's own statements, never refused. */
    private readonly raw: PoolClient,
    private readonly pool: Pool,
    private readonly completeSql: string,
    /** Our transaction's id, digits only (from `txid_current()::text`). */
    private readonly xid: string,
    /** The store's read timeout, for its own statements here too (see `storeStatement`). */
    private readonly queryTimeoutMs?: number,
  ) {
    const pid = (raw as { processID?: unknown }).processID;
    this.#pid = typeof pid === 'number' ? pid : undefined;
    // `raw` came from checkOut, which already listens for its 'error' event (ignoreConnectionError)
    // and so keeps a dying connection from ending the process; giveBack takes that listener off.
    this.client = new Proxy(raw, {
      get: (target, property) => {
        if (property === 'query') return this.#query;
        // A handler that gave the client back would let the next pool user write inside our
        // transaction, and our ROLLBACK would then erase that user's writes.
        if (property === 'release') return refuseRelease;
        return Reflect.get(target, property, target) as unknown;
      },
    });
  }

  readonly #query = (...args: unknown[]): unknown => {
    if (this.#ending === undefined) return Reflect.apply(this.raw.query, this.raw, args);
    const error = new Error(
      '[idemkit] [postgres] This query came after the handler answered (or failed): idemkit has committed or rolled back the transaction, so it would run outside it. Finish every write before answering.',
    );
    const config = args[0] as { submit?: unknown; callback?: unknown } | null | undefined;
    // pg's three call styles: a Submittable (Cursor, QueryStream), a callback, a promise.
    if (typeof config?.submit === 'function') throw error;
    const callback = args.findLast((arg) => typeof arg === 'function') ?? config?.callback;
    if (typeof callback === 'function') return void process.nextTick(callback as (error: Error) => void, error);
    return Promise.reject(error);
  };

  complete(key: string, token: LeaseToken, response: StoredResponse, ttlMs: number): Promise<boolean> {
    if (this.#ending) {
      return Promise.reject(new Error('[idemkit] [postgres] This transaction was already completed or rolled back.'));
    }
    const completing = this.#complete([...completeParams(key, token, response, ttlMs), this.xid]);
    this.#ending = completing;
    return completing;
  }

  async #complete(params: unknown[]): Promise<boolean> {
    let row: { ours: boolean; updated: boolean } | undefined;
    try {
      ({ rows: [row] } = await this.raw.query<{ ours: boolean; updated: boolean }>(storeStatement(this.completeSql, this.queryTimeoutMs, params)));
    } catch (error) {
      // The session refuses statements: our transaction, aborted by a failed statement (nothing
      // committed), or one the handler began after committing ours.
      if ((await this.#rollbackThenFate()) === 'committed') throw new TransactionEndedError();
      // in_failed_sql_transaction: a statement of the handler's failed before this one.
      if ((error as { code?: unknown }).code === '25P02') throw new TransactionAbortedError(undefined, { cause: error });
      throw error;
    }
    if (row?.ours !== true) {
      // Nothing was written. The ROLLBACK ends whatever the handler began after ending ours.
      await this.#end('ROLLBACK');
      throw new TransactionEndedError();
    }
    if (row.updated && !this.#abort) {
      // A failed COMMIT throws (after the client is released): the caller must not claim success.
      // So does one Postgres answered with ROLLBACK: a statement failed after the completion.
      if ((await this.#end('COMMIT', true)) !== 'COMMIT') {
        throw new Error('[idemkit] [postgres] COMMIT was answered with ROLLBACK: a statement failed in the transaction after the completion, so nothing was committed.');
      }
      return true;
    }
    // The lease was lost (taken over, expired): the stale holder's writes must vanish.
    await this.#end('ROLLBACK', true);
    return false;
  }

  async rollback(): Promise<void> {
    if (this.#ending) {
      // Already ending (complete's COMMIT, a rollback): never send ROLLBACK in between, and do
      // not return before it has: the caller frees the key after this. An unfinished complete
      // rolls back instead of committing.
      this.#abort = true;
      try {
        await this.#ending;
      } catch (error) {
        if (error instanceof TransactionEndedError) throw error;
      }
      return;
    }
    const rolling = this.#rollback();
    this.#ending = rolling;
    return rolling;
  }

  async #rollback(): Promise<void> {
    // The engine frees the key after this (a thrown handler, a status that is not stored):
    // only right if the session was still in our transaction, whose writes this ROLLBACK undoes.
    let ours: boolean | undefined;
    let readOnly: boolean | undefined;
    try {
      const results = (await this.raw.query(storeStatement(askThenRollback(this.xid), this.queryTimeoutMs))) as unknown as Array<QueryResult<{ ours?: boolean; read_only?: boolean }>>;
      ours = results[0]?.rows[0]?.ours;
      readOnly = results[2]?.rows[0]?.read_only;
    } catch {
      // An aborted session refuses the question (and skips that ROLLBACK): ours, after a failed
      // statement, or the handler's own after it committed ours; the fate tells which.
      if ((await this.#rollbackThenFate(true)) === 'committed') throw new TransactionEndedError();
      return;
    }
    // A read-only session (see #rollbackThenFate) whose handler only read: destroyed, not given
    // back, or the next pool user's write (the engine's release of this key, say) fails on it.
    this.#release(readOnly === true ? true : undefined);
    if (ours !== true) throw new TransactionEndedError();
  }

  /**
   * ROLLBACK, give the client back, and say what became of our transaction. Asked on the same
   * connection, after the ROLLBACK, so an aborted session cannot refuse the question; on another
   * connection only when ours died (asked again while the pool is busy or the answer is still
   * `in progress`; see #fateElsewhere).
   */
  async #rollbackThenFate(rethrow = false): Promise<Fate | undefined> {
    let fate: Fate | undefined;
    let readOnly: boolean | undefined;
    try {
      const results = (await this.raw.query(storeStatement(rollbackThenFate(this.xid), this.queryTimeoutMs))) as unknown as Array<QueryResult<{ fate: Fate; read_only: boolean }>>;
      ({ fate, read_only: readOnly } = results[1]?.rows[0] ?? {});
    } catch (error) {
      this.#release(error);
      fate = await this.#fateElsewhere();
      if (rethrow && fate !== 'committed') throw error;
      return fate;
    }
    // A read-only session (a connection to a demoted primary or a standby, opened while the
    // address still led there) failed the handler's writes with 25006. Given back, it was the
    // next connection out (the pool hands out the last one in), so the engine's release of the
    // key failed on it too and the key stayed claimed for the whole lease. Destroyed instead.
    this.#release(readOnly === true ? true : undefined);
    return fate;
  }

  /** `in progress` only while the server has not yet aborted what the dead connection held. */
  async #fateElsewhere(): Promise<Fate | undefined> {
    let fate: Fate | undefined;
    const since = Date.now();
    let ended = false;
    for (let attempt = 0, wait = FATE_FIRST_WAIT_MS; attempt < FATE_ATTEMPTS; attempt++, wait = Math.min(wait * 2, FATE_MAX_WAIT_MS)) {
      try {
        const { rows } = await this.pool.query<{ fate: Fate }>(storeStatement(FATE, this.queryTimeoutMs, [this.xid]));
        fate = rows[0]?.fate;
        if (fate !== 'in progress') return fate;
        // Still open on the server a read timeout later, on a connection we closed: behind a
        // silent network the server sees no close and keeps it (and its row locks, which every
        // retry of the key waits on) until its TCP timeout, minutes. Ended here instead: only
        // that backend, and only while it still holds our transaction; what it had not committed
        // is then rolled back, and the next answer says so.
        if (!ended && this.#pid !== undefined && Date.now() - since >= Math.min(this.queryTimeoutMs ?? DEFAULT_QUERY_TIMEOUT_MS, DEFAULT_QUERY_TIMEOUT_MS)) {
          await this.pool.query(storeStatement(TERMINATE_OURS, this.queryTimeoutMs, [this.#pid, this.xid]));
          ended = true; // only once it was asked: a busy pool's refusal is asked again next time
        }
      } catch {
        // The pool is busy or the server away for a moment: ask again.
      }
      // An ended pool will not answer again; and the waits must not hold the process open.
      if (this.pool.ending || attempt === FATE_ATTEMPTS - 1) break;
      await new Promise((resolve) => setTimeout(resolve, wait).unref());
    }
    return fate;
  }

  /**
   * Send COMMIT/ROLLBACK and give the client back; a client whose last command failed is
   * destroyed. Resolves to the command tag: `ROLLBACK` for a COMMIT of an aborted transaction.
   */
  async #end(command: 'COMMIT' | 'ROLLBACK', rethrow = false): Promise<string | undefined> {
    let tag: string | undefined;
    try {
      ({ command: tag } = await this.raw.query(storeStatement(command, this.queryTimeoutMs)));
    } catch (error) {
      this.#release(error);
      // A COMMIT with no answer (the read timeout, a connection lost) is no rollback: the server
      // may have committed it (a slow deferred trigger, an answer lost on the way). What it did
      // decides, asked on another connection.
      if (command === 'COMMIT' && (await this.#fateElsewhere()) === 'committed') return 'COMMIT';
      if (rethrow) throw error;
      return undefined;
    }
    this.#release();
    return tag;
  }

  /** Back to the pool; after a failed command the connection's state is unknown, so it is destroyed. */
  #release(failure?: unknown): void {
    giveBack(this.raw, failure === undefined ? undefined : failure instanceof Error ? failure : true);
  }
}

/**
 * One of the store's own statements: parsed with the store's parsers (never the pool's own
 * `types`), and with its read timeout, on the transaction's client too. Without it a COMMIT whose
 * answer never came (a network black hole) held its connection for good: after `max` of them
 * the pool had none left, and every request was a 503 after the network healed. A timed-out
 * statement fails its command, so the client is destroyed, not given back.
 */
export function storeStatement(text: string, queryTimeoutMs: number | undefined, values?: unknown[]): QueryConfig {
  // Every store statement builds one: a plain object, no spreads. pg reads `query_timeout` per
  // query (its types omit it); an undefined one falls back to the pool's.
  return { text, values, types: STORE_TYPES, query_timeout: queryTimeoutMs } as QueryConfig;
}

function refuseRelease(): never {
  throw new Error('[idemkit] [postgres] Do not release() the transaction client; the engine commits or rolls back and releases it.');
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
