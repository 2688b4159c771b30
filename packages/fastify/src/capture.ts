import { replayHeaders, type StoredResponse } from '@idemkit/core';
import type { FastifyReply } from 'fastify';

/**
 * The bytes of an `onSend` payload, or `undefined` when it cannot be buffered. By `onSend`
 * Fastify has already serialised objects to a string, so string and Buffer cover every normal
 * reply; streams (Node or web) and `Response` objects are left alone, as @fastify/etag does.
 */
export function payloadBytes(payload: unknown): Uint8Array | undefined {
  if (payload === undefined || payload === null) return new Uint8Array(0);
  if (typeof payload === 'string') return Buffer.from(payload, 'utf8');
  if (payload instanceof Uint8Array) return payload;
  return undefined;
}

/** A web `Response` carries its own status, which Fastify applies only after `onSend`. */
export function payloadStatus(payload: unknown, fallback: number): number {
  if (typeof payload === 'object' && payload !== null && Object.prototype.toString.call(payload) === '[object Response]') {
    const status = (payload as { status?: unknown }).status;
    if (typeof status === 'number') return status;
  }
  return fallback;
}

/** What a replay sends: the stored response, and the payload object handed to `reply.send`. */
export interface Replayed {
  readonly response: StoredResponse;
  readonly payload: Buffer | undefined;
  /** What the route's own `onSend` hooks get after ours (see `asSerialised`; a replay's is set by `sendReplay`). */
  serialised: string | Buffer | undefined;
  /**
   * Neither the stored answer (a `reply.serializer()` without `reply.type()`) nor a hook for this
   * request gave the replay a content-type: Fastify gives its Buffer `application/octet-stream`,
   * which the plugin takes off again (set by `sendReplay`).
   */
  untyped: boolean;
}

/** What sending `response` as it is (a problem answer) sends. */
export function replayOf(response: StoredResponse): Replayed {
  const payload = payloadOf(response.body);
  let type: string | undefined;
  for (const [name, value] of response.headers) if (name.toLowerCase() === 'content-type') type = value;
  return { response, payload, serialised: asSerialised(type, payload), untyped: false };
}

/** What a replay of `response` sends; `sendReplay` sets the rest from the type it goes out with. */
export function storedReplay(response: StoredResponse): Replayed {
  return { response, payload: payloadOf(response.body), serialised: undefined, untyped: false };
}

const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
/** Types Fastify's own answers are strings of (objects serialised to JSON, text, markup, scripts), or that name a charset. */
const TEXTUAL = /json|xml|javascript|ecmascript|^\s*text\/|charset=/i;

/**
 * A stored JSON, text or markup body as the string Fastify's own serialised answer was: the route's
 * `onSend` hooks (which run after ours) then get what they got on the first request, not a
 * Buffer their `payload.replace()` throws on. Valid UTF-8 decodes and encodes back to the same
 * bytes, so what goes out is unchanged; other bytes stay a Buffer.
 */
function asSerialised(type: string | undefined, payload: Buffer | undefined): string | Buffer | undefined {
  if (payload === undefined) return undefined;
  if (type === undefined || !TEXTUAL.test(type)) return payload;
  try {
    return utf8.decode(payload);
  } catch {
    return payload;
  }
}

/** Replay a stored response: its status, its headers plus `Idempotent-Replayed: true`, its exact bytes. */
export function sendReplay(reply: FastifyReply, replayed: Replayed): void {
  restoreReplay(reply, replayed, true);
  // The type the replay goes out with: the stored one, or (never stored: see toStoredHeaders) one
  // a hook set for this request before the key was claimed, as on the first answer.
  const type = reply.getHeader('content-type');
  replayed.untyped = type === undefined;
  replayed.serialised = asSerialised(typeof type === 'string' ? type : undefined, replayed.payload);
  reply.send(replayed.payload);
}

/**
 * Put a replay's stored status and headers (back) on the reply. Fastify's `reply.header` adds
 * cookies to those already set (by hooks, for this request: only the handler's own were stored),
 * so they are added once, not again when the stored answer is put back after an onSend rewrite.
 */
export function restoreReplay(reply: FastifyReply, { response }: Replayed, first = false): void {
  reply.code(response.status);
  // To a HEAD, the Content-Length its answer went out with (stored: see settle's `head`); one
  // that went out with none (`reply.send()` with no length, on a HEAD route of its own) has none
  // stored, and gets none: not the `0` of the empty stored body. Fastify gives a HEAD the length
  // of a payload when none is set, as on the first answer (and so did records stored before the
  // length was). To any other method, the stored body and its length.
  const head = reply.request.method === 'HEAD';
  const unsized = head && !response.headers.some(isLength);
  for (const [name, value] of replayHeaders(response, head)) {
    if ((first || name !== 'set-cookie') && !(unsized && name === 'content-length')) reply.header(name, value);
  }
}

const isLength = ([name]: readonly [string, string]): boolean => name === 'content-length';

/** Write core's problem response (status, headers, RFC 9457 bytes) unchanged. */
export function sendStored(reply: FastifyReply, stored: Replayed): FastifyReply {
  reply.code(stored.response.status);
  for (const [name, value] of stored.response.headers) reply.header(name, value);
  return reply.send(stored.payload);
}

// An empty body goes out as "no payload", so Fastify does not invent a content-type for it.
function payloadOf(body: Uint8Array): Buffer | undefined {
  return body.byteLength === 0 ? undefined : Buffer.from(body.buffer, body.byteOffset, body.byteLength);
}
