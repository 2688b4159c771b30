import { fingerprintMismatch, isTransactionAborted, isTransactionEnded, requestInProgress, ResponseNotReplayableError, retryAfterSeconds, StoreUnavailableError } from './errors.js';
import { isJobRecord, JOB_RESULT_HEADER, REPLAYED_HEADER } from './headers.js';
import { problemResponse } from './problem.js';
import type { ResolvedOptions } from './options.js';
import type { LeaseToken, StoreTransaction, StoredResponse } from './store.js';
import type { AbandonReason, IdempotencyContext, IdempotencyEvent, Lease, UnbufferedReason } from './types.js';
import { StoreTimeoutError, type StoreCall } from './deadline.js';
import type { StoreCloseWatch } from './store-close.js';

/** The marker's `reason`: the binding's, or the engine's own for a handler that ended its transaction. */
type MarkerReason = UnbufferedReason | 'transaction-ended' | 'store-refused';

/** Backoff of a completion retried after a store failure: the first wait, and the longest. */
const COMPLETE_RETRY_FIRST_MS = 100;
const COMPLETE_RETRY_MAX_MS = 5_000;
/** Timed-out renewals still unsettled, beyond which no other is sent (see `renewIfDue`). */
const MAX_STUCK_RENEWALS = 2;

/** What a lease needs from its engine; kept narrow so the lease cannot make decisions. */
export interface LeaseHost {
  readonly options: ResolvedOptions<never>;
  readonly renewals: RenewalClock;
  /** Calls the store under its deadline. */
  readonly call: StoreCall;
  /** Says when the store's close() is called: a completion retried in the background ends then. */
  readonly storeClosed: StoreCloseWatch;
  emit(event: IdempotencyEvent): void;
  /** A job's engine (`idempotent()`): its 410 markers carry `JOB_RESULT_HEADER`, as its results do. */
  readonly strictFingerprint: boolean;
  /** Whether a stored record belongs to another operation (its fingerprint differs from `ours`). */
  differs(ours: string | null, stored: string | null): boolean;
  /** The answer was stored (completion sent at `sentAt`): the engine may keep it for local replays (`localCache`). */
  remember(id: string, fingerprint: string | null, response: StoredResponse, sentAt: number): void;
}

/**
 * One timer per engine drives the renewals of all its running leases. A timer per lease cost a
 * timer insert and removal on every request (seen in `pnpm bench`'s profile), for renewals that
 * almost never happen: most handlers finish long before a third of the lease has passed. The
 * leases form an intrusive linked list, so joining and leaving cost a few pointer writes and no
 * allocation or hashing (a Set cost about a microsecond per request in the same profile).
 */
export class RenewalClock {
  #head: RunningLease | null = null;
  #timer: NodeJS.Timeout | undefined;
  /** A lease renews once this long has passed since it was taken or last renewed. */
  readonly everyMs: number;
  readonly #tickMs: number;

  constructor(leaseMs: number) {
    // Renew at a third of the lease, so two renewals can fail before another process takes over.
    // Ticks at a twelfth: a renewal starts at most 5/12 of a lease after the last one, still
    // leaving room for two failures.
    this.everyMs = Math.max(10, Math.floor(leaseMs / 3));
    this.#tickMs = Math.max(5, Math.floor(leaseMs / 12));
  }

  add(lease: RunningLease): void {
    lease.clockNext = this.#head;
    if (this.#head !== null) this.#head.clockPrev = lease;
    this.#head = lease;
    if (this.#timer === undefined) {
      this.#timer = setInterval(() => this.#tick(), this.#tickMs);
      this.#timer.unref();
    }
  }

  /** Idempotent: a lease that already left is left alone. */
  delete(lease: RunningLease): void {
    const { clockPrev: prev, clockNext: next } = lease;
    if (prev === null && this.#head !== lease) return;
    if (prev === null) this.#head = next;
    else prev.clockNext = next;
    if (next !== null) next.clockPrev = prev;
    lease.clockPrev = lease.clockNext = null;
    // The timer stops at its next idle tick, not here: under load leases come and go constantly.
  }

  #tick(): void {
    if (this.#head === null) {
      clearInterval(this.#timer);
      this.#timer = undefined;
      return;
    }
    const now = performance.now();
    for (let lease: RunningLease | null = this.#head; lease !== null; lease = lease.clockNext) lease.renewIfDue(now);
  }
}

/**
 * True when body and headers together exceed the store's `maxResponseBytes` (MongoDB's one
 * document of 16 MiB): `maxBodyBytes` counts the body alone, so a body just under it with large
 * headers could not be stored, and the engine retried that completion for two leases (every retry
 * of the key a 409) before storing its 410 marker. Costs a sum over the header strings per
 * commit; UTF-8 bytes are counted exactly only when the cheap upper bound (3 per char) is over.
 */
function overStoreLimit(response: StoredResponse, limit: number | undefined): boolean {
  if (limit === undefined) return false;
  let chars = 0;
  for (const [name, value] of response.headers) chars += name.length + value.length;
  if (response.body.byteLength + 3 * chars <= limit) return false;
  const encoder = new TextEncoder();
  let bytes = response.body.byteLength;
  for (const [name, value] of response.headers) bytes += encoder.encode(name).byteLength + encoder.encode(value).byteLength;
  return bytes > limit;
}

/**
 * The right to run one handler for one key. Renews itself while the handler runs and settles
 * exactly once: the first of commit / commitUnbuffered / abandon wins, later calls do nothing.
 */
export class RunningLease implements Lease {
  readonly context: IdempotencyContext;
  #settled = false;
  /** The answer's body fit maxBodyBytes, but body and headers together not the store's record (its marker says so). */
  #overStoreLimit = false;
  #renewDueAt: number;
  /** Links of the engine's renewal clock (owned by RenewalClock). */
  clockPrev: RunningLease | null = null;
  clockNext: RunningLease | null = null;
  #replacement: StoredResponse | null = null;
  #renewing = false;
  /** When the renewal in flight (if any) was sent: one sent after the lease ended cannot extend it. */
  #renewSentAt = 0;
  /** The answer whose completion failed and is retried in the background (the lease keeps renewing meanwhile). */
  #retrying: StoredResponse | null = null;
  /** Renewals for a retried completion stop here (see #completeLater), so the lease can run out. */
  #retryRenewsUntil = 0;
  /** The 410 marker sent instead of a retried answer the store kept refusing (see #completeLater). */
  #retryMarker: StoredResponse | null = null;
  /** Settles when the background completion ends (see #endRetry); null when none ran. */
  #retryEnded: Promise<void> | null = null;
  #retryEnd: (() => void) | null = null;
  /** Ends the background completion when the store is closed (see #completeLater); null when none waits. */
  #onStoreClosed: (() => void) | null = null;
  /** The handler ended its own transaction (see #afterTransactionEnded). */
  #transactionEnded = false;
  /** A transactional completion or rollback outlasted the store deadline: the key is held (and renewed) until it settles. */
  #outcomePending = false;
  /** Transactional: the handler's own failed statement had aborted the transaction (see #replaceIfRolledBack). */
  #abortedByHandler = false;
  /** The key was given up (deleted under this lease's token): nobody else holds it. */
  #keyFreed = false;
  /** Renewals that outlasted the store deadline and have not settled yet. */
  #stuckRenewals = 0;
  /** When the lease runs out unless renewed, by this process's clock (a store refuses a holder after it). */
  #leaseEndsAt: number;

  constructor(
    private readonly host: LeaseHost,
    readonly key: string,
    private readonly id: string,
    private readonly token: LeaseToken,
    readonly tookOver: boolean,
    private readonly tx: StoreTransaction | undefined,
    /** When `begin` was sent: the store's lease started no earlier. */
    beganAt: number,
    /** This request's fingerprint: kept with a stored answer, and after a rollback it tells whose answer the key holds. */
    private readonly fingerprint: string | null,
  ) {
    this.context = Object.freeze({ key, tookOver, transaction: tx?.client });
    // Due a third of a lease after `begin` was sent, not after it answered: a slow answer has
    // already used part of the lease.
    this.#renewDueAt = beganAt + host.renewals.everyMs;
    this.#leaseEndsAt = beganAt + host.options.leaseMs;
    host.renewals.add(this);
  }

  get settled(): boolean {
    return this.#settled;
  }

  get replacement(): StoredResponse | null {
    return this.#replacement;
  }

  /**
   * A completion the store failed, retried in the background (see #completeLater): settles when
   * that retry ends (landed, marked, or given up, each reported as an event); null when there is
   * none. For callers nobody else waits on (`idempotent()`): a binding sends its answer without it.
   */
  get backgroundCompletion(): Promise<void> | null {
    return this.#retryEnded;
  }

  async commit(response: StoredResponse): Promise<boolean> {
    if (!this.#settle()) return false;
    try {
      const { storable, maxBodyBytes } = this.host.options;
      if (!storable(response.status)) {
        await this.#release('not-storable', response.status);
        return false;
      }
      const overStore = response.body.byteLength <= maxBodyBytes && overStoreLimit(response, this.host.options.store.maxResponseBytes);
      if (overStore || response.body.byteLength > maxBodyBytes) {
        this.#overStoreLimit = overStore;
        await this.#replaceIfRolledBack(await this.#storeMarker(response.status, 'too-large'), response.status);
        return false;
      }
      const stored = await this.#complete(response);
      // Checked here first: the common case (stored) costs no extra promise per request.
      if (!stored) await this.#replaceIfRolledBack(stored, response.status);
      return stored;
    } finally {
      this.#stopRenewing();
    }
  }

  async commitUnbuffered(status: number | null, reason: UnbufferedReason): Promise<void> {
    if (!this.#settle()) return;
    try {
      // No status went out (cut short): whether it would have been storable is unknown, and the
      // handler may still be working, so it is never run again.
      if (status !== null && !this.host.options.storable(status)) await this.#release('not-storable', status);
      // A binding that still holds the answer (a body over maxBodyBytes) sends the replacement.
      else await this.#replaceIfRolledBack(await this.#storeMarker(status, reason), status ?? undefined);
    } finally {
      this.#stopRenewing();
    }
  }

  letLapse(): void {
    if (this.#settled) return;
    if (!this.tx) {
      this.host.renewals.delete(this);
      return;
    }
    // A crashed holder's transaction dies with its connection; this one would stay open (its row
    // locks in the way of the request that takes over, its connection out of the pool) with
    // nobody left to end it. So when the lease would have run out it is rolled back and the key
    // freed, unless settled first. Renewals go on until then, so that rollback (or, for a handler
    // that committed by itself, its 410 marker) still lands while the key is this lease's.
    // Not before a whole lease from now, though, while renewals get through: the lease's end as it
    // stands now can be as little as two thirds of a lease away (the next renewal was due), and a
    // handler still at work that would have finished by then was rolled back, and its retry ran it
    // a second time, where without transactions it gets a lease's time and is stored.
    const lapseAt = performance.now() + this.host.options.leaseMs;
    const lapseWhenDue = (): void => {
      if (this.#settled) return;
      const now = performance.now();
      const due = Math.min(lapseAt, this.#leaseEndsAt);
      if (now < due) setTimeout(lapseWhenDue, due - now).unref();
      else void this.#lapse();
    };
    setTimeout(lapseWhenDue, Math.max(0, this.#leaseEndsAt - performance.now())).unref();
  }

  async #lapse(): Promise<void> {
    if (!this.#settle()) return;
    try {
      await this.#rollbackThenFree('rolled-back', null);
    } finally {
      this.#stopRenewing();
    }
  }

  async abandon(reason: AbandonReason): Promise<void> {
    if (!this.#settle()) return;
    try {
      await this.#release(reason);
    } finally {
      this.#stopRenewing();
    }
  }

  /**
   * Transactional mode: not stored means rolled back (or not known yet), so the handler's answer
   * must not go out. Not when the handler ended the transaction itself: its writes may have
   * committed, and its own answer is the truest there is.
   */
  async #replaceIfRolledBack(stored: boolean, status?: number): Promise<void> {
    if (stored || !this.tx || this.#transactionEnded) return;
    // A client error from a handler whose own failed statement aborted its transaction (it
    // caught the unique violation it expected and answered 422): it claims no writes, and none
    // were made, so it goes out as it is, not stored; a 503 would be retried and fail the same
    // way forever. Only then: not after a lost connection or a failed COMMIT (the answer may rest
    // on writes that vanished; retry), nor once another request holds the key (its answer rules).
    if (this.#abortedByHandler && this.#keyFreed && status !== undefined && status >= 400 && status < 500) return;
    this.#replacement = this.#outcomePending ? outcomeUnknown() : await this.#answerAfterRollback();
  }

  #settle(): boolean {
    if (this.#settled) return false;
    this.#settled = true;
    return true;
  }

  /**
   * Renewal goes on until the final write has landed, not just until it starts: on a slow store
   * the completion itself can outlast what is left of the lease, and a takeover then would run
   * the handler a second time while its answer is being stored (seen in the MongoDB soak).
   */
  #stopRenewing(force = false): void {
    if ((this.#retrying !== null || this.#outcomePending) && !force) return;
    this.host.renewals.delete(this);
  }

  /** Called by the engine's renewal clock on every tick. */
  renewIfDue(now: number): void {
    if (now < this.#renewDueAt) return;
    // Past its end the lease cannot be renewed (stores refuse a lapsed holder): the retried
    // completion is about to give up, and a renewal would only hold that off. Past the retry's
    // renewal budget it is left to run out.
    if (this.#retrying !== null && (now >= this.#leaseEndsAt || now >= this.#retryRenewsUntil)) return;
    // One renewal in flight at a time: on a slow store, ticks must not queue up renewals that
    // would then delay the completion behind them. One that timed out may never settle (a dead
    // connection with no socket timeout), so a second goes out when due, on another connection
    // once the store is back; with two stuck, none until one settles. A renewal that cannot go
    // now stays due, and goes at the first tick that can send it.
    if (this.#renewing || this.#stuckRenewals >= MAX_STUCK_RENEWALS) return;
    this.#renewDueAt = now + this.host.renewals.everyMs;
    void this.#renew();
  }

  async #renew(): Promise<void> {
    this.#renewing = true;
    const { store, leaseMs } = this.host.options;
    const sent = performance.now();
    this.#renewSentAt = sent;
    let pending: Promise<boolean> | undefined;
    try {
      const ok = await this.host.call('renew', () => (pending = store.renew(this.id, this.token, leaseMs)));
      if (ok) this.#leaseEndsAt = sent + leaseMs;
      // While a completion is retried, a refused renewal ends the retries: the lease is over
      // (or an attempt that timed out here did land; #endRetry tells which).
      else if (this.#retrying !== null) void this.#endRetry('refused');
      // Otherwise, once settled, a refused renewal only means the completion (or release) got
      // there first.
      else if (!this.#settled) {
        this.#stopRenewing();
        this.#lost('renew');
        // Refused while a late outcome is pending: the store has moved on (that outcome landed, or
        // the key was taken over, which the outcome will report). Nothing more to renew.
      } else if (this.#outcomePending) this.#stopRenewing(true);
    } catch (error) {
      // Keep renewing: a brief store outage should not cost the lease if the store comes back.
      this.#storeError('renew', error);
      // A renewal that timed out still holds its connection until it settles: counted, so a
      // store that hangs every call is not sent one more per tick.
      if (error instanceof StoreTimeoutError && pending) {
        this.#stuckRenewals++;
        const unstuck = (): void => void this.#stuckRenewals--;
        pending.then(unstuck, unstuck);
      }
    } finally {
      this.#renewing = false;
    }
  }

  /**
   * The response cannot be replayed (stream, too large). Store a marker so retries get a
   * documented problem instead of running the handler again (SPEC §2).
   */
  async #storeMarker(status: number | null, reason: MarkerReason, viaTx = this.tx !== undefined): Promise<boolean> {
    return this.#complete(this.#marker(status, reason), status, viaTx);
  }

  #marker(status: number | null, reason: MarkerReason): StoredResponse {
    const ran = status === null ? 'The request with this key already ran' : `The request with this key already ran and answered ${status}`;
    const why =
      reason === 'transaction-ended'
        ? 'its handler ended the database transaction it was given (COMMIT or ROLLBACK)'
        : reason === 'store-refused'
          ? 'the store kept refusing to store its answer'
          : status === null || reason === 'cut-short'
          ? 'its answer was cut short before it went out'
          : reason === 'too-large'
            ? this.#overStoreLimit
              ? `its body and headers were more than the store can keep in one record (${String(this.host.options.store.maxResponseBytes)} bytes)`
              : `its body was larger than maxBodyBytes (${this.host.options.maxBodyBytes} bytes)`
            : reason === 'not-serializable'
              ? 'its result could not be serialised'
              : 'it was streamed';
    const detail = `${ran}, but ${why}, so it was not stored. The operation is not run again.`;
    const error = new ResponseNotReplayableError('ERR_IDEMKIT_RESPONSE_NOT_REPLAYABLE', 410, detail, {
      extensions: { originalStatus: status, reason },
    });
    const marker = problemResponse(error);
    // So that a route with `fingerprint: false` on the key never replays it as its own answer.
    return this.host.strictFingerprint ? { ...marker, headers: [...marker.headers, [JOB_RESULT_HEADER, '1']] } : marker;
  }

  /**
   * `originalStatus`: what the handler answered, for the marker stored if the handler turns out
   * to have ended its transaction. `viaTx`: false to write outside the transaction (that marker).
   */
  async #complete(response: StoredResponse, originalStatus: number | null = response.status, viaTx = this.tx !== undefined): Promise<boolean> {
    const { store, ttlMs } = this.host.options;
    const tx = viaTx ? this.tx : undefined;
    let late: Promise<boolean> | undefined;
    // Only with a local cache, which counts the answer's TTL from here: every other request skips it.
    const keep = this.host.options.localCache !== null;
    const sentAt = keep ? performance.now() : 0;
    try {
      const ok = await this.host.call('complete', () =>
        tx ? (late = tx.complete(this.id, this.token, response, ttlMs)) : store.complete(this.id, this.token, response, ttlMs),
      );
      if (!ok) this.#lost('complete');
      else if (keep) this.host.remember(this.id, this.fingerprint, response, sentAt);
      if (this.host.options.onEvent) this.host.emit({ type: 'completed', key: this.key, status: response.status, stored: ok });
      return ok;
    } catch (error) {
      if (tx && isTransactionEnded(error)) {
        await this.#afterTransactionEnded(originalStatus);
        return false;
      }
      // The handler's own failed statement aborted its transaction: an application error, not a
      // store outage, so no `store-error` (it would trip store alerts); said as a warning instead.
      if (tx && isTransactionAborted(error)) {
        this.host.options.logger?.warn(`[idemkit] A statement the handler for key "${this.key}" ran had failed and aborted its transaction: nothing was committed, and the key is free for a retry.`);
      } else this.#storeError('complete', error);
      if (tx && error instanceof StoreTimeoutError && late) {
        // Its COMMIT may still land: the key is settled by what the completion really did.
        this.#followLate(
          late,
          (ok) => {
            if (!ok) this.#lost('complete');
            if (this.host.options.onEvent) this.host.emit({ type: 'completed', key: this.key, status: response.status, stored: ok });
          },
          (failure) => (isTransactionEnded(failure) ? this.#afterTransactionEnded(originalStatus) : this.#freeKey('rolled-back')),
        );
        return false;
      }
      if (tx) {
        // Nothing of the handler's committed (a transaction the handler left aborted, a lost
        // connection): free the key, or every retry meets 409 until the lease runs out. Safe even
        // if a COMMIT did land unseen: release only deletes a record still in progress under
        // this token.
        this.#abortedByHandler = isTransactionAborted(error);
        await this.#rollbackThenFree('rolled-back', originalStatus);
      } else {
        this.#completeLater(response);
      }
      return false;
    }
  }

  /**
   * The handler ran and its answer goes out, but the store failed to record it (a blip, a
   * failover). Giving up would leave the key in progress until the lease ran out, and the next
   * retry would then run the handler a second time. So the lease keeps renewing and the
   * completion is retried with backoff until it lands or the lease runs out (stores refuse a
   * holder after that; every renewal that gets through pushes the end further): once the store
   * is back, retries get the replay. Only a store away for the rest of the lease (or this
   * process dying) ends it. Renewals go on for two leases at most: a store that renews but keeps
   * refusing this one write (a payload limit, a per-statement timeout) would otherwise hold the
   * key at 409 for as long as the process lives.
   */
  #completeLater(response: StoredResponse): void {
    this.#retrying = response;
    this.#retryEnded = new Promise((resolve) => (this.#retryEnd = resolve));
    this.#retryRenewsUntil = performance.now() + 2 * this.host.options.leaseMs;
    const { store, ttlMs } = this.host.options;
    let delay = COMPLETE_RETRY_FIRST_MS;
    // Past the renewal budget: the answer once more at once (an attempt sent before the store
    // came back may have failed for that alone), then the marker.
    let lastChance = false;
    // A closed store (a worker shutting down) can store nothing more: the retry ends at once, or,
    // with an attempt in flight, as soon as that attempt settles (it may still land). Not left to
    // run until the lease ends: a job call waits for this, and with it the process's exit.
    const closed = this.host.storeClosed;
    let inFlight = false;
    if (closed.closed) return void this.#endRetry('closed');
    this.#onStoreClosed = () => void (inFlight || this.#endRetry('closed'));
    closed.add(this.#onStoreClosed);
    const attempt = (): void => {
      if (this.#retrying === null) return; // ended meanwhile (a refused renewal, the store closed)
      // Once the marker has been tried, it is what is retried (until the lease runs out).
      const marker = this.#retryMarker;
      inFlight = true;
      this.host.call('complete', () => store.complete(this.id, this.token, marker ?? response, ttlMs)).then(
        (ok) => {
          inFlight = false;
          void this.#endRetry(ok ? (marker ? 'marked' : 'stored') : 'refused');
        },
        () => {
          inFlight = false;
          if (this.#retrying === null) return;
          if (closed.closed) return void this.#endRetry('closed');
          // Renewals got through for two leases while the answer did not: the store refuses this
          // one write (a payload limit). While the lease still holds, the small 410 marker is
          // retried instead, so retries get 410, never a second run of the handler.
          if (this.#retryMarker === null && performance.now() >= this.#retryRenewsUntil && this.#leaseEndsAt > performance.now()) {
            if (!lastChance) {
              lastChance = true;
              return schedule(0);
            }
            this.#retryMarker = this.#marker(response.status, 'store-refused');
            delay = COMPLETE_RETRY_FIRST_MS;
            return schedule(0);
          }
          // Stores refuse a holder whose lease has run out, so retrying past it is pointless;
          // renewals (while the store answers them) push that end further. A renewal still in
          // flight may yet push it: wait for it before giving up.
          const left = this.#leaseEndsAt - performance.now();
          const renewalMayExtend = this.#renewing && this.#renewSentAt < this.#leaseEndsAt;
          if (left <= 0 && !renewalMayExtend) return void this.#endRetry('gave-up');
          // Halfway to the end at most: an attempt sent right at it would only be refused.
          schedule(left > 0 ? Math.min(delay, left / 2) : COMPLETE_RETRY_FIRST_MS);
        },
      );
    };
    const schedule = (ms: number): void => {
      setTimeout(attempt, ms).unref();
      delay = Math.min(delay * 2, COMPLETE_RETRY_MAX_MS);
    };
    schedule(delay);
  }

  /**
   * End the background completion, once: it landed; or it (or a renewal) was refused, which
   * means the lease is over unless an attempt that timed out here did land (the record holds
   * this lease's own answer); or the store stayed away until the lease ran out.
   */
  async #endRetry(outcome: RetryOutcome): Promise<void> {
    const response = this.#retrying;
    if (response === null) return;
    this.#retrying = null;
    this.#stopRenewing(true);
    if (this.#onStoreClosed !== null) {
      this.host.storeClosed.delete(this.#onStoreClosed);
      this.#onStoreClosed = null;
    }
    try {
      await this.#retryOutcome(response, outcome);
    } finally {
      this.#retryEnd?.();
    }
  }

  /** Report how the background completion ended. */
  async #retryOutcome(response: StoredResponse, outcome: RetryOutcome): Promise<void> {
    if (outcome === 'closed') {
      // Nothing to read back: the store is closed. The key stays in progress until its lease runs out.
      if (this.host.options.onEvent) this.host.emit({ type: 'completed', key: this.key, status: response.status, stored: false });
      this.host.emit({ type: 'lease-lost', key: this.key, operation: 'complete' });
      this.host.options.logger?.error(
        `[idemkit] The store was closed while the answer for key "${this.key}" was still being retried (the store had failed to store it): it was not stored ` +
          '(unless an attempt that timed out still lands). The key stays in progress until its lease runs out, and a retry after that may run the handler again. ' +
          'Let running calls finish before closing the store.',
      );
      return;
    }
    // A marker sent meanwhile may be what the record holds (its reply lost, or a renewal refused
    // because it had landed): then that is the outcome.
    if (outcome !== 'stored' && outcome !== 'marked' && this.#retryMarker !== null && (await this.#holdsOwnAnswer(this.#retryMarker))) outcome = 'marked';
    if (outcome === 'marked') {
      if (this.host.options.onEvent) this.host.emit({ type: 'completed', key: this.key, status: response.status, stored: false });
      this.host.options.logger?.error(
        `[idemkit] The store kept failing to store the answer for key "${this.key}" while it renewed its lease: stored the 410 marker (reason "store-refused") instead, so a retry gets 410 and the handler is not run again.`,
      );
      return;
    }
    const stored = outcome === 'stored' || (await this.#holdsOwnAnswer(response));
    if (this.host.options.onEvent) this.host.emit({ type: 'completed', key: this.key, status: response.status, stored });
    if (stored) return;
    if (outcome === 'refused') return this.#lost('complete');
    this.host.emit({ type: 'lease-lost', key: this.key, operation: 'complete' });
    this.host.options.logger?.error(
      `[idemkit] Gave up storing the answer for key "${this.key}": the store kept failing the completion until its lease ran out. A retry with this key may run the handler again.`,
    );
  }

  /** Whether the record holds this lease's own answer (an attempt that timed out here did land). */
  async #holdsOwnAnswer(response: StoredResponse): Promise<boolean> {
    try {
      const record = await this.host.call('get', () => this.host.options.store.get(this.id));
      const stored = record?.state === 'completed' ? record.response : null;
      return stored !== null && stored.status === response.status && Buffer.compare(stored.body, response.body) === 0;
    } catch {
      return false;
    }
  }

  /**
   * What the client gets instead of a rolled-back answer: the winner's stored response if it has
   * finished, 409 while it runs, else 503. All say "retry with the same key" and a retry replays.
   * Unless the key now holds another request (another fingerprint took it over): then the 422 a
   * retry would get, never that request's answer.
   */
  async #answerAfterRollback(): Promise<StoredResponse> {
    const { store } = this.host.options;
    try {
      const record = await this.host.call('get', () => store.get(this.id));
      // A job's record is never a `fingerprint: false` route's answer (see Engine#completed).
      const jobs = this.fingerprint === null && (record?.response ? isJobRecord(record.response) : false);
      if (record && (jobs || this.host.differs(this.fingerprint, record.fingerprint))) {
        this.host.emit({ type: 'mismatch', key: this.key });
        return problemResponse(fingerprintMismatch());
      }
      if (record?.state === 'completed' && record.response) {
        this.host.emit({ type: 'replayed', key: this.key, status: record.response.status });
        return { ...record.response, headers: [...record.response.headers, [REPLAYED_HEADER, 'true']] };
      }
      if (record?.state === 'in_progress' && record.leaseExpiresAt !== null) {
        // The store's clock against ours: rough, and only on this rare path.
        return problemResponse(
          requestInProgress(
            retryAfterSeconds(record.leaseExpiresAt - Date.now()),
            'This request took too long and another request with the same key took over; its work was rolled back. Retry after the time in Retry-After to get the result.',
          ),
        );
      }
    } catch (error) {
      this.#storeError('get', error);
    }
    return problemResponse(
      new StoreUnavailableError(
        'ERR_IDEMKIT_STORE_UNAVAILABLE',
        503,
        this.#abortedByHandler
          ? 'A statement the handler ran had failed, which aborted its transaction: nothing was committed. Retry with the same key (a statement that may fail needs a SAVEPOINT around it, or ON CONFLICT).'
          : 'The operation was rolled back and not committed. Retry with the same key.',
        // `idempotentTransaction()` tells its caller which it was: an aborted transaction is no store outage.
        this.#abortedByHandler ? { extensions: { reason: 'transaction-aborted' } } : {},
      ),
    );
  }

  /** `status`: the handler's answer, if there was one (for the marker if its transaction ended). */
  async #release(reason: AbandonReason, status: number | null = null): Promise<void> {
    // Roll the handler's writes back before the key is free again, so a retry starts clean.
    if (this.tx) {
      await this.#rollbackThenFree(reason, status);
      return;
    }
    await this.#freeKey(reason);
  }

  /**
   * The handler ended its transaction itself (a helper's own BEGIN/COMMIT on the client, say):
   * its writes committed or vanished apart from the record, and which one cannot be told. Running
   * it again could write twice and replaying its answer could claim writes that never happened,
   * so retries get the "not replayable" answer, stored outside the transaction, and the
   * developer gets an error that names the cause.
   */
  async #afterTransactionEnded(status: number | null): Promise<boolean> {
    this.#transactionEnded = true;
    this.host.options.logger?.error(
      `[idemkit] The handler for key "${this.key}" ended the transaction it was given (COMMIT or ROLLBACK on the transaction client). ` +
        'Its writes are no longer tied to the stored response and may or may not have committed, so its answer is not stored ' +
        'and the operation is not run again: retries get 410. Let idemkit commit; do not COMMIT, ROLLBACK or BEGIN on that client.',
    );
    return this.#storeMarker(status, 'transaction-ended', false);
  }

  async #freeKey(reason: AbandonReason | 'rolled-back'): Promise<void> {
    const { store } = this.host.options;
    try {
      const ok = await this.host.call('release', () => store.release(this.id, this.token));
      this.#keyFreed = ok;
      if (ok) this.host.emit({ type: 'released', key: this.key, reason });
      else this.#lost('release');
    } catch (error) {
      // The lease will simply expire; nothing else to do.
      this.#storeError('release', error);
    }
  }

  /**
   * Roll back, then free the key; or, when the handler committed the transaction itself, store
   * the marker instead. Under the store deadline like every store call, so a rollback stuck behind
   * a hung query does not hang the request; but its outcome is then followed in the background,
   * and the key freed only once it is known: until then the handler's own COMMIT may still land.
   */
  async #rollbackThenFree(reason: AbandonReason | 'rolled-back', status: number | null): Promise<void> {
    const tx = this.tx as StoreTransaction;
    const after = async (ended: boolean): Promise<void> => void (ended ? await this.#afterTransactionEnded(status) : await this.#freeKey(reason));
    let pending: Promise<void> | undefined;
    try {
      await this.host.call('rollback', () => (pending = tx.rollback()));
    } catch (error) {
      if (isTransactionEnded(error)) return after(true);
      this.#storeError('rollback', error);
      if (error instanceof StoreTimeoutError && pending) {
        this.#followLate(pending, () => after(false), (late) => after(isTransactionEnded(late)));
        return;
      }
    }
    return after(false);
  }

  /**
   * A transactional completion or rollback outlasted the store deadline. Until it settles the
   * outcome is unknown, so the key stays held and the lease renewed (a retry meanwhile gets 409),
   * and the client was told so; then `settled` or `failed` settle the key by what really happened.
   */
  #followLate<T>(late: Promise<T>, settled: (value: T) => unknown, failed: (error: unknown) => unknown): void {
    this.#outcomePending = true;
    const done = (): void => {
      this.#outcomePending = false;
      this.#stopRenewing();
    };
    late.then(settled, failed).then(done, done);
  }

  #lost(operation: 'complete' | 'renew' | 'release'): void {
    this.host.emit({ type: 'lease-lost', key: this.key, operation });
    if (operation === 'renew') {
      // Nothing is late yet: the handler is still at work, and another may now run beside it.
      this.host.options.logger?.warn(
        `[idemkit] Lease for key "${this.key}" was lost while its handler was still running (a renewal was refused): it had run out, and another process may take the key over ` +
          'and run it again meanwhile (or the store lost the record). Its answer will be refused when it ends, and nothing will be overwritten.',
      );
      return;
    }
    this.host.options.logger?.warn(
      // The store only says "not yours": the lease ran out (a stall, a slow handler whose renewals
      // failed), then maybe another process took the key over, or the record vanished (a store
      // restarted without persistence). Say no more than that.
      `[idemkit] Lease for key "${this.key}" was lost before ${operation}: it had run out, and another process may have taken the key over ` +
        '(or the store lost the record); the late result was refused and nothing was overwritten.',
    );
  }

  #storeError(operation: string, error: unknown): void {
    this.host.emit({ type: 'store-error', key: this.key, operation, error });
    this.host.options.logger?.error(`[idemkit] Store ${operation} failed for key "${this.key}".`, error);
  }
}

/** How a background completion ended; 'closed': the store's close() was called first. */
type RetryOutcome = 'stored' | 'marked' | 'refused' | 'gave-up' | 'closed';

/** The answer while a rolled-back-or-not outcome is still being settled (see #rollbackThenFree). */
function outcomeUnknown(): StoredResponse {
  return problemResponse(
    new StoreUnavailableError(
      'ERR_IDEMKIT_STORE_UNAVAILABLE',
      503,
      'The outcome of the operation could not be confirmed in time. Retry with the same key: once it is known, a retry gets the stored answer, or runs the operation again if nothing of it was committed.',
    ),
  );
}
