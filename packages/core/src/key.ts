import { parseItem } from 'structured-headers';
import { hasRequestBody } from './headers.js';
import type { IncomingHeaders } from './types.js';

/** Longest key accepted (Stripe's limit; the IETF draft sets none). */
export const MAX_KEY_LENGTH = 255;

export type KeyParseResult =
  | { readonly ok: true; readonly key: string }
  | { readonly ok: false; readonly reason: string };

/** Printable ASCII only: no control characters, no non-ASCII (SPEC §2). */
const PRINTABLE_ASCII = /^[\x20-\x7e]+$/;

/**
 * Read one header value as a key. The draft's structured-field form (`"abc"`, an sf-string,
 * parameters ignored) and the bare form (`abc`) are both accepted.
 */
export function parseKeyHeader(value: string): KeyParseResult {
  // Only the optional whitespace HTTP allows around a field value (SP, HTAB; RFC 9110 §5.5).
  // Not `trim()`: it also strips U+00A0 (byte 0xA0 read as latin1), U+FEFF and line separators,
  // which would make `abc<0xA0>` the same key as `abc` instead of the 400 a non-ASCII key gets.
  const raw = trimOws(value);
  if (raw.startsWith('"')) {
    let item: ReturnType<typeof parseItem>;
    try {
      item = parseItem(raw);
    } catch {
      return { ok: false, reason: 'The key looks like a structured-field string but does not parse (RFC 9651).' };
    }
    if (typeof item[0] !== 'string') {
      return { ok: false, reason: 'The structured-field key must be a string.' };
    }
    return validateKey(item[0]);
  }
  // Proxies may join repeated header lines into one with ", " (RFC 9110 §5.3), so a bare comma
  // could be two keys in disguise; a key that really holds one can be sent as an sf-string.
  if (raw.includes(',')) {
    return { ok: false, reason: 'A bare key may not contain a comma: the request has several Idempotency-Key headers (joined with ", " on the way), or one key with a comma in it. Send exactly one header, and quote a key that holds a comma as a structured-field string ("a,b").' };
  }
  return validateKey(raw);
}

/** Without the spaces and tabs at either end. A loop, not a regex: `/[ \t]+$/` backtracks on a long run of inner spaces (16 000 of them took 300 ms). */
function trimOws(value: string): string {
  let start = 0;
  let end = value.length;
  while (start < end && isOws(value.charCodeAt(start))) start++;
  while (end > start && isOws(value.charCodeAt(end - 1))) end--;
  return start === 0 && end === value.length ? value : value.slice(start, end);
}

function isOws(code: number): boolean {
  return code === 0x20 || code === 0x09;
}

/** The built-in rules: 1–255 printable ASCII characters. */
export function validateKey(key: string): KeyParseResult {
  if (key.length === 0) return { ok: false, reason: 'The key is empty.' };
  if (key.length > MAX_KEY_LENGTH) {
    return { ok: false, reason: `The key is ${key.length} characters long; at most ${MAX_KEY_LENGTH} are allowed.` };
  }
  if (!PRINTABLE_ASCII.test(key)) {
    return { ok: false, reason: 'The key may hold printable ASCII characters only (no control or non-ASCII characters).' };
  }
  return { ok: true, key };
}

/**
 * The identity a store sees. Length-prefixing the scope makes the pair unambiguous: no
 * (scope, key) pair can spell another pair's identity, whatever characters either holds.
 */
export function scopedKey(scope: string | undefined, key: string): string {
  return scope === undefined || scope === '' ? `-:${key}` : `${scope.length}:${scope}:${key}`;
}

/** The parsed body carries the key field (`bodyField`): a plain object with it as its own property. */
export function hasBodyField(body: unknown, field: string | false): boolean {
  return field !== false && typeof body === 'object' && body !== null && !Array.isArray(body) && !(body instanceof Uint8Array) && Object.hasOwn(body, field);
}

/** A content type whose body could carry a key field (`bodyField`): JSON or a form. */
export function mayHoldBodyKey(contentType: string | undefined): boolean {
  if (contentType === undefined) return false;
  const type = contentType.toLowerCase();
  return type.includes('json') || type.startsWith('application/x-www-form-urlencoded') || type.startsWith('multipart/form-data');
}

/** Where the options say a key may come from. */
export interface KeySources {
  readonly getKey?: unknown;
  readonly header: string;
  readonly bodyField: string | false;
  readonly required: boolean;
}

/** The engine reads the parsed body: for the default fingerprint, and for a key in the body. */
export function readsBody(o: Pick<KeySources, 'getKey' | 'bodyField'> & { readonly fingerprint: unknown }): boolean {
  return o.fingerprint === 'default' || (o.getKey === undefined && o.bodyField !== false);
}

/**
 * Whether a request may carry a key, told before the engine looks: a key header, a custom
 * `getKey`, or the key field in a parsed body. Only such a request is fingerprinted, so only its
 * body must be readable, and only its uploads hashed. An unread body (`undefined`) that is JSON or
 * a form may hold the key field itself: with `required` it counts (refused as unread, not told
 * "no key" for a key it may have); without, a keyless request goes through (a webhook that reads
 * its raw body itself). `carriesBody`: whether the request has body bytes, as the binding saw them
 * (`requestCarriesBody`); by default told from its headers alone (`hasRequestBody`).
 */
export function mayHaveKey(o: KeySources, headers: IncomingHeaders, body: unknown, carriesBody?: boolean): boolean {
  if (o.getKey !== undefined || headers[o.header.toLowerCase()] !== undefined) return true;
  if (body !== undefined) return hasBodyField(body, o.bodyField);
  return o.required && unreadBodyMayHoldKey(o, headers, body, carriesBody);
}

/**
 * A body no parser read (`undefined`, with bytes on the wire) that may hold the key field: JSON or
 * a form. Without `required`, a keyless request with one goes through unfingerprinted, and a key
 * the client put there is never seen: bindings say so once (`unreadBodyKeyWarning`).
 * `carriesBody` as in {@link mayHaveKey}: the headers alone miss an HTTP/2 body sent without
 * Content-Length (a body key there was told 400 "no key" instead of 415, and passed through
 * unwarned without `required`), and count a chunked body that ended with no bytes (warned as
 * unread, though the parser read it).
 */
export function unreadBodyMayHoldKey(o: Pick<KeySources, 'bodyField'>, headers: IncomingHeaders, body: unknown, carriesBody: boolean = hasRequestBody(headers)): boolean {
  if (body !== undefined || o.bodyField === false || !carriesBody) return false;
  const type = headers['content-type'];
  return mayHoldBodyKey(typeof type === 'string' ? type : undefined);
}

/** The once-only warning for `unreadBodyMayHoldKey`, named after the binding that logs it. */
export function unreadBodyKeyWarning(binding: string, contentType: string | undefined, field: string | false): string {
  return (
    `[idemkit] [${binding}] A ${JSON.stringify(contentType ?? '')} request without a key header went through with its body unread (no parser before idempotency()): ` +
    `a key in its \`${String(field)}\` field would not be seen, and its retries would run again. Mount the body parser before idempotency() for routes that take body keys. (Warned once.)`
  );
}
