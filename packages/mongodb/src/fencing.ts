import type { Collection } from 'mongodb';
import type { ClaimDocument, ClaimId, IdempotencyDocument } from './document.js';

/**
 * How conditional writes are made atomic.
 * - 'native': each operation is one document update; MongoDB applies filter and update atomically.
 * - 'claims': FerretDB v1 checks the filter and writes the document in two steps, so two
 *   conditional updates can both succeed. Each transition first inserts a unique claim.
 */
export type Fencing = 'native' | 'claims';

/**
 * A claim blocks other writers of that record version for at most this long if its writer dies
 * between claim and write: takers then claim the next window. A writer stalled longer than this
 * between two round trips could race a taker; leases far longer than one round trip make that moot.
 */
export const CLAIM_WINDOW_MS = 10_000;

/**
 * A writer that took a claim must send its write before a taker could walk past that claim, or
 * give up (drop the claim, return false): takers move on only once the record's lease has ended
 * and the claim is CLAIM_WINDOW_MS old, and a writer that wrote after that (an event-loop or GC
 * stall, a slow driver queue between its check and its write) overwrote or deleted the taker's
 * record, so two runs of the handler went on at once. This margin before that moment is left for
 * the write's way to the server and for the two processes' clocks to disagree. Timed by a
 * monotonic clock. A write delayed on the network after it was sent is beyond this: see the README.
 */
export const WRITE_MARGIN_MS = CLAIM_WINDOW_MS / 2;

/**
 * How long after taking (or finding) its claim a writer may still send its write, given how much
 * of the record's lease was left then (0 for takers: the record they replace has expired) and how
 * old the claim already was (a holder's leftover): takers walk past once both have run out.
 */
export function writeWithinMs(leaseLeftMs: number, claimAgeMs = 0): number {
  return Math.max(leaseLeftMs, CLAIM_WINDOW_MS - claimAgeMs) - WRITE_MARGIN_MS;
}

/** A claim document expires this long after it was taken (so its age is known from `expiresAt`). */
const CLAIM_TTL_MS = 2 * CLAIM_WINDOW_MS;

/** Dead writers in a row a taker walks past before giving up for now (each cost it a window). */
const MAX_WINDOWS = 8;

const DUPLICATE_KEY = 11000;

/**
 * By its code, not `instanceof MongoServerError`: the `Db` may come from another copy of the
 * driver (Mongoose brings its own), whose errors are not instances of ours.
 */
export function isDuplicateKey(error: unknown): boolean {
  return typeof error === 'object' && error !== null && (error as { code?: unknown }).code === DUPLICATE_KEY;
}

/** The claim a lease holder takes (complete, release, renew): its token, window 0. */
export function holderClaim(key: string, token: string): ClaimId {
  return { k: key, t: token, e: null, g: 0 };
}

/**
 * The first claim a taker tries on an expired record (window 0; see `Claims.takeInTurn` for the
 * next ones). In-progress records are fenced by token, so it is the holder's own claim and a
 * takeover excludes the holder's complete/release/renew; completed records (no token) are fenced
 * by their expiry instant.
 */
export function takeoverClaim(record: IdempotencyDocument): ClaimId {
  const expiresAt = record.expiresAt;
  const token = record.state === 'in_progress' ? (record.token ?? null) : null;
  return { k: record._id, t: token, e: token === null ? expiresAt : null, g: 0 };
}

function claimKey(id: ClaimId): string {
  return JSON.stringify([id.k, id.t, id.e === null ? null : id.e.getTime(), id.g]);
}

/** Claims in their own collection, so purge counts and user queries see records only. */
export class Claims {
  constructor(readonly collection: Collection<ClaimDocument>) {}

  /** True if this caller now owns the claim; false if another writer already took it. */
  async take(id: ClaimId, now: number): Promise<boolean> {
    try {
      await this.collection.insertOne({ _id: claimKey(id), expiresAt: new Date(now + CLAIM_TTL_MS) });
      return true;
    } catch (error) {
      if (isDuplicateKey(error)) return false;
      throw error;
    }
  }

  /**
   * The lease holder's claim (its id is also window 0 of the lease's takers, which is what
   * excludes them). Returns the claim's age in ms (0 for a fresh one), or null when another
   * writer holds it. The claim there may be the holder's own, left by an earlier operation of
   * this lease whose drop failed: one lease's operations run one at a time, so that claim guards
   * nothing else, and refusing would lock the holder out of its own lease. It is used as it is,
   * with its age: takers go by that age, so the holder's write deadline must too (writeWithinMs).
   * (Replacing it raced a taker that had already read the old one, and a purge.)
   */
  async takeAsHolder(id: ClaimId, now: number): Promise<number | null> {
    const _id = claimKey(id);
    try {
      await this.collection.insertOne({ _id, expiresAt: new Date(now + CLAIM_TTL_MS), by: 'holder' });
      return 0;
    } catch (error) {
      if (!isDuplicateKey(error)) throw error;
    }
    const there = await this.collection.findOne({ _id });
    if (there?.by !== 'holder') return null;
    return Math.max(0, now - (there.expiresAt.getTime() - CLAIM_TTL_MS));
  }

  /** Drop a claim; a failure is left to the claim's expiry (the holder can still use its own: takeAsHolder). */
  async dropQuietly(id: ClaimId): Promise<void> {
    await this.drop(id).catch(() => undefined);
  }

  /**
   * Take the claim of window 0, or of the first window after it whose claim is free, moving on
   * only past a claim older than `CLAIM_WINDOW_MS` (its writer died between claim and write).
   * Every taker walks the same windows from 0, so two takers never hold claims of one version
   * at once. (Picking the window from each caller's clock did that: two takers either side of a
   * window boundary took different claims, and both replaced the record.) Null when the claim is
   * gone (let the caller look again); when another writer holds it (alive, or dead within its
   * window), how long until takers may walk past it.
   */
  async takeInTurn(first: ClaimId, now: number): Promise<ClaimId | { heldForMs: number } | null> {
    for (let g = 0; g < MAX_WINDOWS; g++) {
      const claim: ClaimId = { ...first, g };
      if (await this.take(claim, now)) return claim;
      const held = await this.collection.findOne({ _id: claimKey(claim) });
      // Gone already (dropped or purged): it was just released, so let the caller look again.
      if (held === null) return null;
      const takenAt = held.expiresAt.getTime() - CLAIM_TTL_MS;
      if (now - takenAt < CLAIM_WINDOW_MS) return { heldForMs: Math.max(1, CLAIM_WINDOW_MS - (now - takenAt)) };
    }
    return null;
  }

  /** Give a claim back after a write that did not happen, so the next writer need not wait. */
  async drop(id: ClaimId): Promise<void> {
    await this.collection.deleteOne({ _id: claimKey(id) });
  }

  /** Take many claims in one round trip; returns the ids this caller now owns. */
  async takeMany(ids: ClaimId[], now: number): Promise<ClaimId[]> {
    if (ids.length === 0) return [];
    const expiresAt = new Date(now + CLAIM_TTL_MS);
    try {
      await this.collection.insertMany(
        ids.map((id) => ({ _id: claimKey(id), expiresAt })),
        { ordered: false },
      );
      return ids;
    } catch (error) {
      const failed = writeErrorIndexes(error);
      if (failed === undefined) throw error;
      return ids.filter((_, i) => !failed.has(i));
    }
  }

  async purge(now: Date): Promise<void> {
    await this.collection.deleteMany({ expiresAt: { $lte: now } });
  }
}

/** Indexes of the duplicate-key failures of an unordered insertMany, or undefined for other errors. */
function writeErrorIndexes(error: unknown): Set<number> | undefined {
  if (typeof error !== 'object' || error === null || !('writeErrors' in error)) return undefined;
  const raw = (error as { writeErrors: unknown }).writeErrors;
  const list: unknown[] = Array.isArray(raw) ? raw : raw === undefined || raw === null ? [] : [raw];
  const failed = new Set<number>();
  for (const e of list as Array<{ code?: number; index?: number }>) {
    if (e.code !== DUPLICATE_KEY || typeof e.index !== 'number') return undefined;
    failed.add(e.index);
  }
  return failed;
}

/**
 * Runs one lease's operations in this process one at a time. In claims mode a renew in flight
 * holds the holder's claim for a moment; the same holder's complete must wait for it rather than
 * fail on the claim. (The engine may fire a renew just before it commits.)
 */
export class PerLeaseQueue {
  readonly #tails = new Map<string, Promise<unknown>>();

  run<T>(key: string, token: string, op: () => Promise<T>): Promise<T> {
    const id = `${key}\u0000${token}`;
    const previous = this.#tails.get(id) ?? Promise.resolve();
    const next = previous.then(op, op);
    const tail = next.then(
      () => undefined,
      () => undefined,
    );
    this.#tails.set(id, tail);
    void tail.then(() => {
      if (this.#tails.get(id) === tail) this.#tails.delete(id);
    });
    return next;
  }
}
