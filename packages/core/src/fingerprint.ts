import { createHash, hash } from 'node:crypto';
import { upperMethod } from './method.js';
import { canonicalJson } from './canonical-json.js';
import { ConfigurationError } from './errors.js';
import type { IncomingRequest } from './types.js';

/** Canonical bytes of a body: raw bytes as they are, strings as UTF-8, anything else as sorted-key JSON. */
export function canonicalBody(body: unknown): Uint8Array | string {
  if (body === undefined || body === null) return '';
  if (body instanceof Uint8Array) return body;
  if (typeof body === 'string') return body;
  if (isUnreadStream(body)) {
    throw new ConfigurationError(
      'ERR_IDEMKIT_BODY_NOT_PARSED',
      'The request body is a stream nothing has read (a body parser that passes the payload on unread), so the fingerprint cannot see it. ' +
        "Read it into a Buffer or string first (Fastify: addContentTypeParser(type, { parseAs: 'buffer' }, …); Express: express.raw()), or give the route a `fingerprint` function.",
    );
  }
  // Sorted keys so `{a,b}` and `{b,a}` hash alike; bigint as text instead of throwing.
  return canonicalJson(body);
}

/** SHA-256 over method, path with query, the canonical body and any uploaded files' digests (SPEC §2). */
export function defaultFingerprint(input: Pick<IncomingRequest, 'method' | 'path' | 'body' | 'files'>, verbatimPath = false): string {
  // NUL separators: neither a method nor a path can contain one, so the fields cannot run together.
  // `verbatimPath`: a job's name (`idempotent()`), which is no request target: cut to its "path",
  // jobs named `https://a.example/hook` and `https://b.example/hook` replayed each other's results.
  let head = `${upperMethod(input.method)}\0${verbatimPath ? input.path : originForm(input.path)}\0`;
  // Only when there are files, so every other request's fingerprint is as it always was.
  if (input.files !== undefined && Object.keys(input.files).length > 0) head += `files\0${canonicalJson(input.files)}\0`;
  const body = canonicalBody(input.body);
  // A raw text body with a lone surrogate (text a parser decoded as UTF-16, which iconv keeps as
  // it is): UTF-8 makes every lone surrogate U+FFFD, so two different bodies hashed alike and the
  // second was replayed the first's answer. Hashed by its UTF-16 code units, under a prefix no other
  // fingerprint has. Only raw strings are scanned: canonical JSON escapes lone surrogates itself.
  if (typeof input.body === 'string' && !(input.body as WellFormedCheck).isWellFormed()) {
    return `sha256-utf16:${createHash('sha256').update(head).update(Buffer.from(input.body, 'utf16le')).digest('base64url')}`;
  }
  // One-shot hash for the common text case (no Hash object per request); bytes need the stream form.
  if (typeof body === 'string') return `sha256:${hash('sha256', head + body, 'base64url')}`;
  return `sha256:${createHash('sha256').update(head).update(body).digest('base64url')}`;
}

/** `String.prototype.isWellFormed` (Node 20; not in the ES2022 lib this package compiles against). */
type WellFormedCheck = string & { isWellFormed(): boolean };

/** `scheme://authority` at the start of a request target in absolute form (RFC 9112 §3.2.2). */
const ABSOLUTE_FORM = /^[a-z][a-z0-9+.-]*:\/\/[^/?#]*/i;

/**
 * The path and query of a request target. A client talking through a proxy may send the absolute
 * form (`POST http://shop.example/orders`), which Node hands on as the URL; its retry sent
 * directly (`POST /orders`) is the same request, not a 422.
 */
function originForm(path: string): string {
  if (path.charCodeAt(0) === 47 /* '/' */) return path;
  const authority = ABSOLUTE_FORM.exec(path);
  if (authority === null) return path;
  const rest = path.slice(authority[0].length);
  return rest.charCodeAt(0) === 47 ? rest : `/${rest}`;
}

/** Whether a key's record belongs to another request: both sides have a fingerprint, and they differ. */
export function fingerprintsDiffer(ours: string | null, stored: string | null): boolean {
  return ours !== null && stored !== null && ours !== stored;
}

/** A Node or web stream: what a parser that passes the payload on leaves as the body. */
function isUnreadStream(body: unknown): boolean {
  if (typeof body !== 'object' || body === null) return false;
  const b = body as { pipe?: unknown; getReader?: unknown };
  return typeof b.pipe === 'function' || typeof b.getReader === 'function';
}
