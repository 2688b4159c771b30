import type { StoredResponse } from './store.js';

/** Added to every replayed response (SPEC §2). */
export const REPLAYED_HEADER = 'idempotent-replayed';

/**
 * The header a job (`idempotent()`) stores last on each of its records: its result and its 410
 * marker (never sent: a job's caller gets the body or an error). It tells a job's record from a
 * route's where fingerprints cannot: a route with `fingerprint: false` matches any fingerprint, a
 * job's too.
 */
export const JOB_RESULT_HEADER = 'idemkit-job-result';

/** Whether a stored answer is a job's (see {@link JOB_RESULT_HEADER}). Records jobs stored before 0.2 have no marker. */
export function isJobRecord(response: StoredResponse): boolean {
  return response.headers.at(-1)?.[0] === JOB_RESULT_HEADER;
}

/**
 * Never stored nor replayed: hop-by-hop headers (RFC 9110 §7.6.1), `date` (the replay gets its
 * own), and `content-length` (recomputed from the stored body).
 */
export const UNREPLAYED_HEADERS: ReadonlySet<string> = new Set([
  'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization', 'proxy-connection',
  'te', 'trailer', 'transfer-encoding', 'upgrade', 'date', 'content-length', REPLAYED_HEADER,
]);

export type OutgoingHeaderValue = number | string | readonly string[] | undefined;

/**
 * Turn a framework's outgoing headers (`res.getHeaders()`, `reply.getHeaders()`) into the stored
 * form: lower-case names, one pair per value, unreplayed headers dropped.
 *
 * `before`: the headers as they stood when the key was claimed (set by middleware mounted before
 * idempotency: CORS, a request id). Those the handler left as they were are not stored: that
 * middleware runs again for a replay and sets them for the retry's own request (its origin, its
 * id), which a stored copy would overwrite.
 *
 * `lengthAsSent`: the answer went out with no body (a 204 or 304, or a HEAD), so its
 * `content-length` is no stored body's to recompute: it is stored as it went out (Node sends a
 * 304's or a HEAD's as given), and {@link responseHeaders} replays it.
 *
 * Headers the answer's `Connection` names (`Connection: close, x-hop`) are hop-by-hop as well
 * (RFC 9110 §7.6.1) and are not stored either.
 */
export function toStoredHeaders(
  headers: Readonly<Record<string, OutgoingHeaderValue>>,
  before?: Readonly<Record<string, OutgoingHeaderValue>>,
  lengthAsSent = false,
): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  let connection: OutgoingHeaderValue;
  // Object.keys and a plain loop: Object.entries cost 2-3x as much on the null-prototype objects
  // Node's getHeaders() returns (3 µs per request in the Koa profile of `pnpm bench`).
  const names = Object.keys(headers);
  for (let i = 0; i < names.length; i++) {
    const rawName = names[i]!;
    const value = headers[rawName];
    const name = rawName.toLowerCase();
    if (value === undefined) continue;
    // Only names that are dropped anyway get a second look: the common case pays nothing more.
    if (UNREPLAYED_HEADERS.has(name)) {
      if (name === 'connection') connection = value;
      if (name !== 'content-length' || !lengthAsSent) continue;
    }
    const earlier = before?.[rawName];
    if (earlier !== undefined && sameHeaderValue(earlier, value)) continue;
    if (Array.isArray(value) && name !== 'set-cookie') {
      // Link, Vary, Server-Timing with a value the handler appended to the middleware's: a replay
      // sets the header as a whole (only cookies are added to the retry's), so all values are kept.
      for (const v of value) out.push([name, String(v)]);
    } else if (Array.isArray(value)) {
      // Set-Cookie: only the cookies the handler added (a replay adds them to those the
      // middleware sets for the retry; see the bindings' replay writers).
      const left = Array.isArray(earlier) ? [...earlier] : typeof earlier === 'string' ? [earlier] : [];
      for (const v of value) {
        const at = left.indexOf(v);
        if (at === -1) out.push([name, String(v)]);
        else left.splice(at, 1);
      }
    } else out.push([name, typeof value === 'string' ? value : String(value)]);
  }
  return connection === undefined ? out : withoutNamedIn(out, connection);
}

/** `stored` without the headers a `Connection` header names (its options, RFC 9110 §7.6.1). */
function withoutNamedIn(stored: Array<[string, string]>, connection: NonNullable<OutgoingHeaderValue>): Array<[string, string]> {
  const named = new Set<string>();
  for (const value of Array.isArray(connection) ? connection : [connection]) {
    for (const option of String(value).split(',')) {
      const name = option.trim().toLowerCase();
      if (name !== '') named.add(name);
    }
  }
  return stored.filter(([name]) => !named.has(name));
}

/**
 * The outgoing headers as they stand now, for `toStoredHeaders(…, before)`. Arrays are copied:
 * `getHeaders()` hands out the live ones, which `cookies` and Fastify's `reply.header('set-cookie')`
 * push into, so an uncopied snapshot would always equal the final answer.
 */
export function snapshotHeaders(headers: Readonly<Record<string, OutgoingHeaderValue>>): Record<string, OutgoingHeaderValue> {
  const copy: Record<string, OutgoingHeaderValue> = {};
  const names = Object.keys(headers);
  for (let i = 0; i < names.length; i++) {
    const name = names[i]!;
    const value = headers[name];
    copy[name] = Array.isArray(value) ? [...(value as readonly string[])] : value;
  }
  return copy;
}

function sameHeaderValue(a: OutgoingHeaderValue | undefined, b: OutgoingHeaderValue): boolean {
  if (a === b) return true;
  if (!Array.isArray(a) || !Array.isArray(b) || a.length !== b.length) return false;
  return a.every((v, i) => v === b[i]);
}

/**
 * A stored response's headers grouped for `res.setHeader(name, value | values)`, with the
 * `content-length` of the stored body (none for 1xx, 204 and 304). Bindings use it to write
 * problems and replays alike.
 *
 * `head`: the answer goes out to a HEAD, which sends no body, so a stored `content-length` (one
 * a HEAD went out with, see toStoredHeaders' `lengthAsSent`) is replayed as it is. To any other
 * method the stored body is sent, so its own length is said: a HEAD's record answers another
 * method's retry where the fingerprint lets it (`fingerprint: false`, or one without the
 * method), and its length, with none of the bytes it counts, left the client waiting for them.
 */
export function responseHeaders(response: StoredResponse, head = false): Map<string, string | string[]> {
  const grouped = new Map<string, string | string[]>();
  for (const [name, value] of response.headers) {
    const prev = grouped.get(name);
    if (prev === undefined) grouped.set(name, value);
    else if (Array.isArray(prev)) prev.push(value);
    else grouped.set(name, [prev, value]);
  }
  // RFC 9110 §8.6: no Content-Length on a 1xx or 204, and on a 304 it would have to be the
  // length of a 200 that is not stored. Node, Express and Fastify would send the '0' as given.
  // A stored one went out with no body (a 204's or 304's, replayed as it is: Node sends neither
  // a body; a HEAD's: replayed as it is only to a HEAD).
  const { status } = response;
  if (status >= 200 && status !== 204 && status !== 304 && !(head && grouped.has('content-length'))) grouped.set('content-length', String(response.body.byteLength));
  return grouped;
}

/** Headers to send with a replay: `responseHeaders` plus `Idempotent-Replayed: true`. */
export function replayHeaders(response: StoredResponse, head = false): Map<string, string | string[]> {
  return responseHeaders(response, head).set(REPLAYED_HEADER, 'true');
}

/**
 * Whether a request carries a body (the test of `type-is`'s hasBody): chunked, or a non-zero
 * Content-Length. Bindings use it to tell "no body" from "a body no parser read".
 */
export function hasRequestBody(headers: Readonly<Record<string, string | readonly string[] | undefined>>): boolean {
  if (headers['transfer-encoding'] !== undefined) return true;
  const length = Number(headers['content-length']);
  return Number.isFinite(length) && length > 0;
}

/** What {@link requestCarriesBody} reads of a Node request: an `IncomingMessage` or HTTP/2's `Http2ServerRequest`. */
export interface NodeRequestLike {
  readonly headers: Readonly<Record<string, string | readonly string[] | undefined>>;
  readonly httpVersionMajor?: number;
  /** The Http2Stream of an HTTP/2 compat request. */
  readonly stream?: { readonly endAfterHeaders?: boolean } | null;
  readonly readableEnded: boolean;
  readonly readableDidRead: boolean;
}

/**
 * Whether a Node request carries body bytes. Framed as a body by its headers ({@link hasRequestBody}),
 * or on HTTP/2 by a HEADERS frame without END_STREAM: HTTP/2 has no Transfer-Encoding, and a
 * client streaming its body (Node's http2 client, fetch with a stream) sends no Content-Length,
 * so the headers alone called it no body and two different bodies under one key shared one
 * answer; one that does send Content-Length is told by it, as on HTTP/1.1. Not a body either
 * way: one a parser read to its end without a single 'data' event (a chunked `0`, an empty DATA
 * frame), as its retry with `Content-Length: 0` is the same request.
 */
export function requestCarriesBody(req: NodeRequestLike): boolean {
  // A Content-Length the HTTP/2 client did send is the body's length (nghttp2 resets a stream
  // whose DATA disagrees): `0` is no body, whether or not an empty DATA frame ends the stream.
  const framed = hasRequestBody(req.headers) || (req.httpVersionMajor === 2 && req.headers['content-length'] === undefined && req.stream?.endAfterHeaders === false);
  return framed && !(req.readableEnded && !req.readableDidRead);
}
