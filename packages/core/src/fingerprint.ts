import { createHash } from 'node:crypto';
import { canonicalJson } from './canonical-json.js';
import type { IncomingRequest } from './types.js';

/** Canonical bytes of a body: raw bytes as they are, strings as UTF-8, anything else as sorted-key JSON. */
export function canonicalBody(body: unknown): Uint8Array | string {
  if (body === undefined || body === null) return '';
  if (body instanceof Uint8Array) return body;
  if (typeof body === 'string') return body;
  // Sorted keys so `{a,b}` and `{b,a}` hash alike; bigint as text instead of throwing.
  return canonicalJson(body);
}

/** SHA-256 over method, path with query, and the canonical body (SPEC §2). */
export function defaultFingerprint(input: Pick<IncomingRequest, 'method' | 'path' | 'body'>): string {
  const hash = createHash('sha256');
  // NUL separators: neither a method nor a path can contain one, so the fields cannot run together.
  hash.update(input.method.toUpperCase()).update('\0').update(input.path).update('\0');
  hash.update(canonicalBody(input.body));
  return `sha256:${hash.digest('base64url')}`;
}
