import type { IdempotencyRecord, StoredResponse } from '@idemkit/core';

/*
 * The record as Redis holds it: one string per key, layout documented in `scripts.ts`. Lua
 * writes every form but the first claim; this file writes that claim and reads all forms.
 */

const COLON = 0x3a;
const TAG_CLAIMED = 0x69; // 'i'
const TAG_COMPLETED = 0x64; // 'd': completed, with the token that completed it
const TAG_COMPLETED_NO_TOKEN = 0x63; // 'c': completed before the token was kept (still read)

/** The value `begin` claims a new key with: `i:<graceMs>:<leaseMs>:<token>[:<fingerprint>]`. */
export function claimValue(graceMs: number, leaseMs: number, token: string, fingerprint: string | null): string {
  const head = `i:${graceMs}:${leaseMs}:${token}`;
  return fingerprint === null ? head : `${head}:${fingerprint}`;
}

/** Whether a record is completed, from its first byte. */
export function isCompleted(value: Buffer): boolean {
  return value[0] === TAG_COMPLETED || value[0] === TAG_COMPLETED_NO_TOKEN;
}

/**
 * Decode a record. `leaseEnd` is the lease end by the Redis clock for an in-progress record (the
 * scripts compute it; a fresh claim only carries its durations) and is ignored once completed.
 */
export function decodeRecord(key: string, value: Buffer, leaseEnd: number): IdempotencyRecord {
  const f = new Fields(value);
  const tag = value[0];
  f.next(); // the tag
  if (tag === TAG_COMPLETED || tag === TAG_COMPLETED_NO_TOKEN) {
    const createdAt = f.int();
    const expiresAt = f.int();
    const status = f.int();
    // Empty when the record has no fingerprint, else the fingerprint's length in bytes.
    const fpBytes = f.intOrNull();
    const headersBytes = f.int();
    if (tag === TAG_COMPLETED && f.next() === '') throw unexpected(); // the token
    let at = f.at;
    let fingerprint: string | null = null;
    if (fpBytes !== null) {
      fingerprint = value.toString('utf8', at, at + fpBytes);
      at += fpBytes;
    }
    const headers = JSON.parse(value.toString('utf8', at, at + headersBytes)) as Array<[string, string]>;
    // A plain copy, so callers never hold a slice of ioredis's pooled reply buffer.
    const body = new Uint8Array(value.subarray(at + headersBytes));
    const response: StoredResponse = { status, headers, body };
    return { key, fingerprint, state: 'completed', leaseExpiresAt: null, response, createdAt, expiresAt };
  }
  if (tag !== TAG_CLAIMED && tag !== 0x70 /* 'p' */) throw unexpected();
  const first = f.int();
  const second = f.int();
  // A script that could not read a lease reports -1; a claim without a token is not a record.
  if (leaseEnd < 0 || f.next() === '') throw unexpected();
  const createdAt = tag === TAG_CLAIMED ? leaseEnd - second : first;
  const fingerprint = f.at > value.length ? null : value.toString('utf8', f.at);
  return { key, fingerprint, state: 'in_progress', leaseExpiresAt: leaseEnd, response: null, createdAt, expiresAt: leaseEnd };
}

/** Something other than an idemkit record (or reply) where one was expected. */
export function unexpected(): Error {
  return new Error('[idemkit] [redis] Found a value that is not an idemkit record: does something else write under this prefix?');
}

/** Reads ':'-separated header fields from the front of a record. */
class Fields {
  /** Where the next field starts; past the end once a field ran to the end of the value. */
  at = 0;
  constructor(private readonly value: Buffer) {}

  next(): string {
    const end = this.value.indexOf(COLON, this.at);
    const stop = end === -1 ? this.value.length : end;
    const text = this.value.toString('latin1', this.at, stop);
    this.at = stop + 1;
    return text;
  }

  int(): number {
    const n = this.intOrNull();
    if (n === null) throw unexpected();
    return n;
  }

  /** A non-negative integer, or null for an empty field. */
  intOrNull(): number | null {
    const text = this.next();
    if (text === '') return null;
    const n = Number(text);
    if (!Number.isInteger(n) || n < 0) throw unexpected();
    return n;
  }
}
