import { randomUUID } from 'node:crypto';
import type { Collection, Filter } from 'mongodb';
import type { BeginResult, IdempotencyRecord, IdempotencyStore, LeaseToken, StoredResponse } from '@idemkit/core';
import { toRecord, toResponseDocument } from './document.js';
import type { ClaimDocument, IdempotencyDocument } from './document.js';
import { Claims, PerLeaseQueue, holderClaim, writeWithinMs, isDuplicateKey, takeoverClaim } from './fencing.js';
import type { Fencing } from './fencing.js';
import { createIndexes } from './indexes.js';
import { ASK_AGAIN_AFTER_MS, ServerClock, localClock, monotonicNow, type StoreClock } from './clock.js';
import type { IndexOutcome } from './indexes.js';
import { resolveOptions } from './options.js';
import type { MongoStoreOptions, ResolvedMongoStoreOptions } from './options.js';

export interface MongoStore extends IdempotencyStore {
  /** The collection records live in. */
  readonly collection: Collection<IdempotencyDocument>;
  /** Where fencing claims live (used only with `fencing: 'claims'`): `<collection>_claims`. */
  readonly claimsCollection: Collection<ClaimDocument>;
  /**
   * Create the TTL indexes on `expiresAt`. Idempotent; safe on every boot. Resolves 'no-ttl' (after
   * one warning through `logger`) on servers without TTL indexes, e.g. FerretDB v1.
   */
  ensureIndexes(): Promise<IndexOutcome>;
  /**
   * The fencing in use ('auto' resolves on the first operation by asking `buildInfo`: 'claims' when
   * it names FerretDB, else 'native', also when the server refuses it under the Stable API's strict mode).
   */
  fencing(): Promise<Fencing>;
}

/** begin gives up after this many lost races in a row (each loss means another caller made progress). */
const MAX_BEGIN_ATTEMPTS = 24;
const DEFAULT_PURGE_LIMIT = 1000;
/** 15 MiB of body in a document of at most 16 MiB. */
const MAX_RESPONSE_BYTES = 15 * 1024 * 1024;

/** MongoDB's largest document (`maxBsonObjectSize`). */
const MAX_DOCUMENT_BYTES = 16 * 1024 * 1024;
/** Room in a completed record for everything but the key, body and headers: field names, dates, status, fingerprint. */
const RECORD_OVERHEAD_BYTES = 1024;
/**
 * Per header: the array element's type and index (up to 6 bytes), the `{ name, value }`
 * subdocument's length and end (5), and each field's type, name, length and NUL (11 and 12): 34
 * at most, rounded up. 32 let 2 000 short headers write a record over 16 MiB.
 */
const HEADER_OVERHEAD_BYTES = 40;

/** About the BSON size of the completed record for `key` (a fingerprint within the overhead; only a custom one of over ~900 bytes is not counted). */
function recordBytes(key: string, response: StoredResponse): number {
  let bytes = RECORD_OVERHEAD_BYTES + Buffer.byteLength(key) + response.body.byteLength;
  for (const [name, value] of response.headers) bytes += HEADER_OVERHEAD_BYTES + Buffer.byteLength(name) + Buffer.byteLength(value);
  return bytes;
}

/**
 * The index a duplicate-key error names: `keyPattern` (MongoDB 4.4+), else the `index: <name>`
 * of its message; `'_id'` for the `_id` index; undefined when it names none (FerretDB v1).
 */
function duplicateIndex(error: unknown): string | undefined {
  const { keyPattern, errmsg, message } = error as { keyPattern?: unknown; errmsg?: unknown; message?: unknown };
  if (typeof keyPattern === 'object' && keyPattern !== null) {
    const fields = Object.keys(keyPattern);
    return fields.length === 1 && fields[0] === '_id' ? '_id' : JSON.stringify(keyPattern);
  }
  const text = typeof errmsg === 'string' ? errmsg : typeof message === 'string' ? message : '';
  const name = / index: (\S+) dup key/.exec(text)?.[1];
  return name === undefined ? undefined : name === '_id_' ? '_id' : name;
}

/** When a lost claim's release is sent again after the first (see `#giveBack`), in ms; then every GIVE_BACK_EVERY_MS while it fails. */
const GIVE_BACK_MS: readonly number[] = [250, 1_000, 3_000];
const GIVE_BACK_EVERY_MS = 5_000;
/** Socket errors of a connection that never opened: nothing can have been sent on it. */
const NOT_CONNECTED = new Set(['ECONNREFUSED', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN']);
/** A short, growing pause between lost races (the winner needs a round trip or two to finish). */
function backoff(attempt: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, Math.min(50, 2 ** attempt)));
}

/** MongoDB's APIStrictError: a command outside the Stable API version the client declared with `strict: true`. */
const API_STRICT_ERROR = 323;

/**
 * True when the server refused a command because it is not in the Stable API (a client created
 * with `serverApi: { version: '1', strict: true }`, as in Atlas's connection snippet). `buildInfo`
 * is not in Stable API V1, so MongoDB (5.0 on) refuses it there; FerretDB v1 ignores `apiStrict`
 * and answers it with `ferretdbVersion`. So this refusal comes only from a server that enforces
 * the Stable API, which is not FerretDB v1 (the one server that needs claims): MongoDB, whose
 * single-document updates are atomic, so native fencing. By code, not `instanceof`: the `Db` may
 * come from another copy of the driver.
 */
function isApiStrictRefusal(error: unknown): boolean {
  return typeof error === 'object' && error !== null && (error as { code?: unknown }).code === API_STRICT_ERROR;
}

/**
 * Keys and tokens go into filters as plain string values, which MongoDB only ever compares for
 * equality (`{ _id: '{"$gt":""}' }` matches that literal string). Only a non-string from an
 * untyped caller could be an operator object, so that is refused. (Plain values rather than
 * `{ $eq: key }` on `_id`: FerretDB v1 pushes only plain `_id` equality down to its index, and
 * scans the whole collection otherwise.)
 */
function assertKey(key: string): void {
  if (typeof key !== 'string') throw new TypeError('[idemkit] [mongodb] key must be a string');
}

/** The latest time a `Date` holds, in epoch ms (ECMAScript's time value range). */
const MAX_DATE_MS = 8.64e15;

/**
 * A TTL or lease in ms, as the other stores take it: a positive finite number whose end a `Date`
 * can hold. `Infinity` made an Invalid Date, stored as 1970: the answer was gone at once, and its
 * retry ran the handler again.
 */
function checkMs(name: string, ms: number, now: number): number {
  // `!(ms > 0)` also refuses NaN; no Date is built for the check (it runs on every begin).
  if (typeof ms !== 'number' || !(ms > 0) || !(now + ms <= MAX_DATE_MS)) {
    throw new RangeError(`[idemkit] [mongodb] \`${name}\` must be a positive number of milliseconds (within a Date's range), got ${String(ms)}.`);
  }
  return ms;
}

function assertToken(token: LeaseToken): void {
  if (typeof token !== 'string') throw new TypeError('[idemkit] [mongodb] token must be a string');
}

function newToken(): LeaseToken {
  return randomUUID() as LeaseToken;
}

/** Only a holder whose lease is still running may act; a lapsed lease belongs to whoever takes over. */
function held(key: string, token: LeaseToken, now: number): Filter<IdempotencyDocument> {
  return { _id: key, token: { $eq: token }, state: 'in_progress', expiresAt: { $gt: new Date(now) } };
}

/** Exactly the version of the record a taker saw (FerretDB drops null fields on insert, hence `?? null`). */
function sameVersion(doc: IdempotencyDocument): Filter<IdempotencyDocument> {
  return { _id: doc._id, token: { $eq: doc.token ?? null }, expiresAt: { $eq: doc.expiresAt } };
}

class MongoIdempotencyStore implements MongoStore {
  readonly shared = true;
  /**
   * A record is one document, and MongoDB refuses documents over 16 MiB (the driver fails to
   * encode them): room is left for the key, fingerprint and headers. The engine refuses a larger
   * `maxBodyBytes`.
   */
  readonly maxResponseBytes = MAX_RESPONSE_BYTES;
  readonly collection: Collection<IdempotencyDocument>;
  readonly claimsCollection: Collection<ClaimDocument>;
  readonly #options: ResolvedMongoStoreOptions;
  readonly #clock: StoreClock;
  readonly #claims: Claims;
  readonly #queue = new PerLeaseQueue();
  #fencing: { readonly answer: Promise<Fencing>; readonly startedAt: number } | undefined;
  #fencingKnown: Fencing | undefined;
  /** Resolves with the first `buildInfo` answer: every operation waiting for one goes on then. */
  readonly #fencingAnswered: Promise<Fencing>;
  #answerFencing: (fencing: Fencing) => void = () => undefined;
  #warned = false;
  #closed = false;

  constructor(options: ResolvedMongoStoreOptions) {
    this.#options = options;
    this.collection = options.collection;
    const db = options.collection.db;
    this.claimsCollection = db.collection<ClaimDocument>(`${options.collection.collectionName}_claims`);
    this.#claims = new Claims(this.claimsCollection);
    this.#clock = options.clock === 'server' ? new ServerClock(db, options.clockRefreshMs) : localClock;
    this.#fencingAnswered = new Promise<Fencing>((resolve) => (this.#answerFencing = resolve));
  }

  fencing(): Promise<Fencing> {
    if (this.#options.fencing !== 'auto') return Promise.resolve(this.#options.fencing);
    if (this.#fencingKnown !== undefined) return Promise.resolve(this.#fencingKnown);
    // Asked once; a failure rejects the operations waiting for it and the next one asks again
    // (a refusal under the Stable API's strict mode is an answer: see isApiStrictRefusal).
    // One still unanswered after ASK_AGAIN_AFTER_MS is asked again by the next operation, and
    // the first answer to any of them lets every waiting operation go on.
    const startedAt = monotonicNow();
    if (this.#fencing === undefined || startedAt - this.#fencing.startedAt >= ASK_AGAIN_AFTER_MS) {
      const asked = {
        startedAt,
        answer: this.collection.db
          .admin()
          .command({ buildInfo: 1 })
          .then(
            (info): Fencing => ('ferretdbVersion' in info ? 'claims' : 'native'),
            (error: unknown): Fencing => {
              if (isApiStrictRefusal(error)) return 'native';
              throw error;
            },
          )
          .then((fencing) => {
            this.#fencingKnown = fencing;
            this.#answerFencing(fencing);
            return fencing;
          }),
      };
      asked.answer.catch(() => {
        if (this.#fencing === asked) this.#fencing = undefined;
      });
      this.#fencing = asked;
    }
    return Promise.race([this.#fencingAnswered, this.#fencing.answer]);
  }

  /** Time and fencing, fetched together (in parallel) on the first operation and cached after. */
  async #prepare(): Promise<[number, Fencing]> {
    const [fencing, now] = await Promise.all([this.fencing(), this.#clock.now()]);
    return [now, fencing];
  }

  /** The name of a unique index of the collection other than _id's, if it has one. */
  async #uniqueIndexBesidesId(): Promise<string | undefined> {
    const indexes = (await this.collection.indexes()) as Array<{ name?: string; unique?: boolean; key?: Record<string, unknown> }>;
    const other = indexes.find((index) => index.unique === true && !(Object.keys(index.key ?? {}).length === 1 && index.key?.['_id'] !== undefined));
    return other === undefined ? undefined : (other.name ?? JSON.stringify(other.key));
  }

  async begin(key: string, fingerprint: string | null, leaseMs: number): Promise<BeginResult> {
    assertKey(key);
    checkMs('leaseMs', leaseMs, Date.now());
    let token: LeaseToken | undefined;
    /** Set while the last takeover was held up by another writer's claim (claims fencing). */
    let heldUp: { now: number; heldForMs: number } | undefined;
    /** Duplicate-key refusals whose index the server did not name (see below). */
    let unexplainedDuplicates = 0;
    /** That refusal: the server wrote nothing, so there is no claim to give back. */
    let refused: Error | undefined;
    try {
      for (let attempt = 0; attempt < MAX_BEGIN_ATTEMPTS; attempt++) {
        const [now, fencing] = await this.#prepare();
        const stampedAt = monotonicNow();
        token = newToken();
        const fresh: Omit<IdempotencyDocument, '_id'> = {
          fingerprint,
          state: 'in_progress',
          token,
          leaseExpiresAt: new Date(now + leaseMs),
          response: null,
          createdAt: new Date(now),
          expiresAt: new Date(now + leaseMs),
        };
        let before: IdempotencyDocument | null;
        try {
          // One round trip for both common cases: a new key is inserted ($setOnInsert), an existing
          // one comes back untouched ('before' document). The unique _id makes the insert atomic.
          before = await this.collection.findOneAndUpdate(
            { _id: key },
            { $setOnInsert: fresh },
            { upsert: true, returnDocument: 'before' },
          );
        } catch (error) {
          // Two upserts raced to insert the same _id; the loser retries and now sees the winner.
          // Not so a unique index of the user's on another field (say `fingerprint`): that
          // refusal came back on every attempt, and begin threw "lost 24 races" after 24 round
          // trips, a store error that named neither the index nor the cure.
          if (!isDuplicateKey(error)) throw error;
          let index = duplicateIndex(error);
          if (index === '_id' || (index === undefined && ++unexplainedDuplicates < 2)) continue;
          if (index === undefined) {
            // No index named (FerretDB v1 says none). A record of this _id: a race on the key.
            if ((await this.collection.findOne({ _id: key }, { projection: { _id: 1 } })) !== null) continue;
            // None either: only a unique index the collection really has is blamed. A key whose
            // record others keep deleting (a cleanup script) loses such races too, and was told
            // to drop an index that does not exist.
            index = await this.#uniqueIndexBesidesId();
            if (index === undefined) continue;
          }
          throw (refused = new Error(
            `[idemkit] [mongodb] Claiming key "${key.slice(0, 100)}" was refused by a unique index other than _id's on ${this.collection.collectionName} (${index}): the store's records must have no unique index but _id's. Drop that index.`,
            { cause: error },
          ));
        }
        if (before === null) return { kind: 'acquired', token, tookOver: false };
        if (before.expiresAt.getTime() > now) {
          const record = toRecord(before);
          const leaseRemainingMs =
            record.state === 'in_progress' && record.leaseExpiresAt !== null ? Math.max(0, record.leaseExpiresAt - now) : 0;
          return { kind: 'existing', record, leaseRemainingMs };
        }
        // Expired (a completed record past its TTL, or a crashed holder's lease): replace it only if
        // it is still the version seen. Of several takers one wins; the others see its record.
        const replaced = await this.#replace(before, fresh, now, stampedAt, fencing);
        if (replaced === true) return { kind: 'acquired', token, tookOver: before.state === 'in_progress' };
        heldUp = replaced === false ? undefined : { now, heldForMs: replaced.heldForMs };
        await backoff(attempt);
      }
      // A claim still held after all that is a writer that died (or stalled) taking the key over:
      // the key is being written, not the store broken, so it reads as running until takers may
      // walk past that claim (409 with Retry-After), never as a store error (503, or a run without
      // idempotency with onStoreError: 'pass'). No record is readable meanwhile: the caller's own
      // fingerprint stands in, so no false 422.
      if (heldUp !== undefined) {
        const until = heldUp.now + heldUp.heldForMs;
        return {
          kind: 'existing',
          record: { key, fingerprint, state: 'in_progress', leaseExpiresAt: until, response: null, createdAt: heldUp.now, expiresAt: until },
          leaseRemainingMs: heldUp.heldForMs,
        };
      }
      throw new Error(`[idemkit] [mongodb] begin lost ${MAX_BEGIN_ATTEMPTS} races in a row for one key`);
    } catch (error) {
      // The claim may have landed though its answer was lost (a socket timeout): the caller was
      // told the store failed, so the key must not stay claimed, answering 409 to its retries,
      // for a whole lease. Fenced by the token: harmless if nothing landed.
      // Also after a server-selection error: with retryable writes, that may be the retry's
      // error, and the first send may have landed. A few spare releases cost less than a key
      // held for a lease. But not when, on a standalone, no server could be selected or no
      // connection opened (see #neverSent): nothing was sent, and after an outage those releases
      // (three commands each with claims fencing, four times over) kept the server from the
      // requests that came once it was back.
      // Nor after a refusal by another unique index (see above): every attempt was refused, so
      // nothing landed, and its releases (three commands each with claims fencing, four times
      // over) would only add load for each such request.
      if (token !== undefined && error !== refused && !this.#neverSent(error)) this.#giveBack(key, token, leaseMs);
      throw error;
    }
  }

  /**
   * True when `error` proves the failed command never left: no server could be selected, no
   * connection could be had from the pool (cleared while the command waited for one), or the
   * connection to carry it could not even be opened (refused, no route, no such host), on a
   * standalone (as the clock's last `hello` said), where the driver does not retry writes. (On a
   * replica set either may be a retry's error, after a first send that landed.) By name and
   * system error code, not `instanceof`: the `Db` may come from another copy of the driver.
   */
  #neverSent(error: unknown): boolean {
    if (this.#clock.standalone !== true || typeof error !== 'object' || error === null) return false;
    const { name, cause } = error as { name?: unknown; cause?: { code?: unknown } };
    if (name === 'MongoServerSelectionError' || name === 'MongoPoolClearedError') return true;
    return name === 'MongoNetworkError' && typeof cause?.code === 'string' && NOT_CONNECTED.has(cause.code);
  }

  /**
   * Release a claim its caller never learnt of, and send the release again while it fails (the
   * server out of reach in the outage that lost the claim's answer), a few times whatever the
   * answers (a claim sent on a connection the driver re-established may land after the first
   * release), for as long as the claim's lease would run: after that the key is free anyway.
   */
  #giveBack(key: string, token: LeaseToken, leaseMs: number): void {
    const until = monotonicNow() + leaseMs;
    let attempt = 0;
    const send = (): void => {
      if (this.#closed) return;
      this.release(key, token).then(
        () => next(false),
        () => next(true),
      );
    };
    const next = (failed: boolean): void => {
      const wait = GIVE_BACK_MS[attempt++] ?? (failed ? GIVE_BACK_EVERY_MS : undefined);
      if (wait === undefined || monotonicNow() + wait > until) return;
      setTimeout(send, wait).unref();
    };
    send();
  }

  async #replace(
    before: IdempotencyDocument,
    fresh: Omit<IdempotencyDocument, '_id'>,
    now: number,
    stampedAt: number,
    fencing: Fencing,
  ): Promise<boolean | { heldForMs: number }> {
    if (fencing === 'native') {
      const result = await this.collection.updateOne(sameVersion(before), { $set: fresh });
      return result.matchedCount === 1;
    }
    // The claim excludes every other writer of this version (holders, takers, purges), so the
    // check and the write below need not be one atomic step; both go by `_id` alone, which
    // FerretDB looks up by index (any other filter makes it scan the collection).
    const claim = await this.#claims.takeInTurn(takeoverClaim(before), now);
    if (claim === null) return false;
    if ('heldForMs' in claim) return claim;
    const current = await this.collection.findOne({ _id: before._id });
    const unchanged =
      current !== null &&
      (current.token ?? null) === (before.token ?? null) &&
      current.expiresAt.getTime() === before.expiresAt.getTime();
    // Stalled since the claim's time stamp: another taker may be past the claim already.
    const inTime = monotonicNow() - stampedAt <= writeWithinMs(0);
    if (unchanged && inTime && (await this.collection.updateOne({ _id: before._id }, { $set: fresh })).matchedCount === 1) return true;
    await this.#claims.drop(claim);
    return false;
  }

  /**
   * Run a holder's conditional write. Native: one atomic update whose filter is the condition.
   * Claims: behind the holder's claim (which excludes takers and purges of this lease) and one
   * write per lease in this process at a time: read by `_id`, check the lease here, write by `_id`.
   * `keepClaim`: the write ends the lease (complete, release), so its claim stays until it expires.
   */
  async #asHolder(
    key: string,
    token: LeaseToken,
    keepClaim: boolean,
    write: (filter: Filter<IdempotencyDocument>, now: number) => Promise<boolean>,
  ): Promise<boolean> {
    assertKey(key);
    assertToken(token);
    const [now, fencing] = await this.#prepare();
    if (fencing === 'native') return write(held(key, token, now), now);
    return this.#queue.run(key, token, async () => {
      const now = await this.#clock.now();
      const stampedAt = monotonicNow();
      const claim = holderClaim(key, token);
      const claimAgeMs = await this.#claims.takeAsHolder(claim, now);
      if (claimAgeMs === null) return false;
      let done = false;
      try {
        const doc = await this.collection.findOne({ _id: key });
        const holds =
          doc !== null && doc.token === token && doc.state === 'in_progress' && doc.expiresAt.getTime() > now;
        // The write goes by `_id` alone (see #replace), so it is fenced only by the claim, which
        // takers walk past once the lease has ended and the claim is CLAIM_WINDOW_MS old: a
        // holder stalled past that since it stamped the claim would overwrite (or delete) a
        // taker's record. It gives up instead.
        const leaseLeftMs = doc === null ? 0 : doc.expiresAt.getTime() - now;
        const inTime = monotonicNow() - stampedAt <= writeWithinMs(leaseLeftMs, claimAgeMs);
        done = holds && inTime && (await write({ _id: key }, now));
      } finally {
        // A drop that fails must not turn a write that happened into a rejection: the claim
        // expires by itself, and this holder can still use it (takeAsHolder).
        if (!done || !keepClaim) await this.#claims.dropQuietly(claim);
      }
      return done;
    });
  }

  // async: a bad argument rejects, as in the other operations, never throws at the call.
  async complete(key: string, token: LeaseToken, response: StoredResponse, ttlMs: number): Promise<boolean> {
    assertKey(key);
    checkMs('ttlMs', ttlMs, Date.now());
    // Refused before anything is sent (no claim taken, the record left as it was, so the holder
    // can still release it): MongoDB refuses the write with a bare BSONObjectTooLarge, and
    // FerretDB v1 kept the oversized document, which no MongoDB restore would take.
    const size = recordBytes(key, response);
    if (size > MAX_DOCUMENT_BYTES) {
      throw new RangeError(
        `[idemkit] [mongodb] The response for key "${key.slice(0, 100)}" would make a record of about ${size} bytes, over MongoDB's 16 MiB document limit (body ${response.body.byteLength} bytes, ${response.headers.length} headers): not stored. Keep answers within maxResponseBytes (${MAX_RESPONSE_BYTES}), headers included.`,
      );
    }
    return this.#asHolder(key, token, true, async (filter, now) => {
      const result = await this.collection.updateOne(filter, {
        $set: {
          state: 'completed',
          token: null,
          leaseExpiresAt: null,
          response: toResponseDocument(response),
          expiresAt: new Date(now + ttlMs),
        },
      });
      return result.matchedCount === 1;
    });
  }

  release(key: string, token: LeaseToken): Promise<boolean> {
    return this.#asHolder(key, token, true, async (filter) => {
      const result = await this.collection.deleteOne(filter);
      return result.deletedCount === 1;
    });
  }

  async renew(key: string, token: LeaseToken, leaseMs: number): Promise<boolean> {
    checkMs('leaseMs', leaseMs, Date.now());
    return this.#asHolder(key, token, false, async (filter, now) => {
      const until = new Date(now + leaseMs);
      const result = await this.collection.updateOne(filter, { $set: { leaseExpiresAt: until, expiresAt: until } });
      return result.matchedCount === 1;
    });
  }

  async get(key: string): Promise<IdempotencyRecord | undefined> {
    assertKey(key);
    const now = await this.#clock.now();
    // Expiry is checked here, not in the filter: the TTL monitor runs only every 60 s (and not at
    // all on FerretDB), and FerretDB v1 reads every document of the collection for any filter
    // but a plain `_id` (seconds beside a few large responses).
    const doc = await this.collection.findOne({ _id: key });
    return doc === null || doc.expiresAt.getTime() <= now ? undefined : toRecord(doc);
  }

  async purgeExpired(limit: number = DEFAULT_PURGE_LIMIT): Promise<number> {
    if (!Number.isInteger(limit) || limit <= 0) throw new RangeError('[idemkit] [mongodb] limit must be a positive integer');
    const [nowMs, fencing] = await this.#prepare();
    const now = new Date(nowMs);
    const expired = await this.collection
      .find({ expiresAt: { $lte: now } }, { projection: { _id: 1, state: 1, token: 1, expiresAt: 1 }, limit })
      .toArray();
    if (expired.length === 0) {
      if (fencing === 'claims') await this.#claims.purge(now);
      return 0;
    }
    if (fencing === 'native') {
      // Re-check expiry in the delete: a record taken over or renewed since the find survives.
      const result = await this.collection.deleteMany({ _id: { $in: expired.map((d) => d._id) }, expiresAt: { $lte: now } });
      return result.deletedCount;
    }
    // Claims: a purge is one more taker. Only records whose takeover claim this purge won are
    // deleted, so a concurrent takeover is never deleted from under its new holder.
    // Window 0 only: a record whose claim another writer holds (or a dead one left) waits for a
    // later purge instead of racing its taker.
    const claims = expired.map((doc) => takeoverClaim(doc));
    const won = new Set((await this.#claims.takeMany(claims, nowMs)).map((c) => c.k));
    const ids = expired.filter((d) => won.has(d._id)).map((d) => d._id);
    const result = ids.length === 0 ? { deletedCount: 0 } : await this.collection.deleteMany({ _id: { $in: ids }, expiresAt: { $lte: now } });
    await this.#claims.purge(now);
    return result.deletedCount;
  }

  async ensureIndexes(): Promise<IndexOutcome> {
    const logger = this.#options.logger;
    const warn = logger === false || this.#warned ? undefined : logger;
    const outcome = await createIndexes(this.collection, warn);
    if (outcome === 'no-ttl') this.#warned = true;
    // Claims exist only with claims fencing; they need no warning of their own (purgeExpired
    // removes expired ones too).
    if ((await this.fencing()) === 'claims') {
      await createIndexes(this.claimsCollection as unknown as Collection<IdempotencyDocument>, undefined);
    }
    return outcome;
  }

  async close(): Promise<void> {
    // The client is the caller's, and the clock holds no timers; only lost claims' releases stop.
    this.#closed = true;
  }
}

/**
 * A MongoDB-backed idempotency store on the official driver. Synchronous and side-effect free:
 * call `ensureIndexes()` once at boot for the TTL index.
 */
export function createMongoStore(options: MongoStoreOptions): MongoStore {
  return new MongoIdempotencyStore(resolveOptions(options));
}
