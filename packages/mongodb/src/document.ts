import type { Binary } from 'mongodb';
import type { IdempotencyRecord, LeaseToken, RecordState, StoredResponse } from '@idemkit/core';

/** One record as it sits in MongoDB. Dates are BSON dates so the TTL index can read `expiresAt`. */
export interface IdempotencyDocument {
  /** The scoped key, always a plain string (never interpreted as an operator). */
  _id: string;
  fingerprint: string | null;
  state: RecordState;
  /** The lease holder's token; null once completed. */
  token: LeaseToken | null;
  leaseExpiresAt: Date | null;
  response: StoredResponseDocument | null;
  createdAt: Date;
  /** For in-progress records the lease end; for completed ones the end of the replay window. */
  expiresAt: Date;
}

export interface StoredResponseDocument {
  status: number;
  /** Objects, not [name, value] pairs: FerretDB v1 rejects nested arrays. Order is kept. */
  headers: Array<{ name: string; value: string }>;
  /** Written as a Buffer (BSON binary); read back as the driver's Binary, or a Buffer with `promoteBuffers`. */
  body: Binary | Uint8Array;
}

export function toResponseDocument(response: StoredResponse): StoredResponseDocument {
  return {
    status: response.status,
    headers: response.headers.map(([name, value]) => ({ name, value })),
    // A Buffer, which every driver writes as BSON binary: not a `Binary` of our copy of the
    // driver, which another copy (Mongoose's) refuses across BSON versions. A copy, so later
    // mutation of the caller's buffer cannot leak in.
    body: Buffer.from(response.body),
  };
}

function bodyBytes(body: Binary | Uint8Array): Uint8Array {
  // A plain Uint8Array (not the driver's Buffer view), sized to the data actually written.
  if (body instanceof Uint8Array) return Uint8Array.from(body);
  return Uint8Array.from(body.buffer.subarray(0, body.position));
}

/**
 * Missing fields read as null: FerretDB v1 drops null-valued fields from an upsert's
 * `$setOnInsert`, so a `null` fingerprint arrives as an absent one.
 */
export function toRecord(doc: IdempotencyDocument): IdempotencyRecord {
  return {
    key: doc._id,
    fingerprint: doc.fingerprint ?? null,
    state: doc.state,
    leaseExpiresAt: doc.state === 'in_progress' && doc.leaseExpiresAt ? doc.leaseExpiresAt.getTime() : null,
    response:
      doc.state === 'completed' && doc.response
        ? {
            status: doc.response.status,
            headers: doc.response.headers.map(({ name, value }) => [name, value] as const),
            body: bodyBytes(doc.response.body),
          }
        : null,
    createdAt: doc.createdAt.getTime(),
    expiresAt: doc.expiresAt.getTime(),
  };
}

/**
 * A fencing claim (`fencing: 'claims'`, FerretDB v1): inserted, never updated, before a record's
 * version is ended (complete, release, takeover) or renewed, so of several concurrent writers
 * exactly one proceeds. An insert on the unique `_id` is the only compare-and-set that is atomic
 * on FerretDB v1, whose updates evaluate the filter and write the document in two steps.
 * Claims live in their own collection (`<records>_claims`) and expire by `expiresAt`.
 */
export interface ClaimDocument {
  /** `JSON.stringify([k, t, e, g])` of the ClaimId: a string, so FerretDB finds it by index. */
  _id: string;
  expiresAt: Date;
  /**
   * 'holder' when the lease holder took it (its own claim id is also window 0 of its takers):
   * a holder that finds its own claim left over (a drop that failed) may go on.
   */
  by?: 'holder';
}

/**
 * Which version of a record a claim fences: the lease token for in-progress records; for
 * completed records (no token) their `expiresAt`. `g` is the window after expiry (see fencing.ts).
 */
export interface ClaimId {
  k: string;
  t: string | null;
  e: Date | null;
  g: number;
}
