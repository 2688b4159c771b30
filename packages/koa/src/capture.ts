import { Stream } from 'node:stream';
import type { Context } from 'koa';

/** Statuses Koa's respond() sends without a body (`statuses.empty`). */
const EMPTY_STATUSES: ReadonlySet<number> = new Set([204, 205, 304]);
const EMPTY = Buffer.alloc(0);

/**
 * What the handler answered: the exact bytes Koa will send, a body that cannot be buffered, or
 * one Koa cannot send at all (it fails it with a 500).
 */
export type Captured = { readonly kind: 'bytes'; readonly body: Buffer } | { readonly kind: 'unbuffered' } | { readonly kind: 'unsendable' };

const UNBUFFERED: Captured = Object.freeze({ kind: 'unbuffered' });
const UNSENDABLE: Captured = Object.freeze({ kind: 'unsendable' });

/**
 * Turn `ctx.body` into the bytes Koa's respond() would write (Koa 3 `lib/application.js`), and
 * leave `ctx` so respond() writes exactly those bytes with the headers read right after: Buffer
 * and string as they are, `null` on 204/205/304 and on an explicit `ctx.body = null`, Koa's status
 * text for an unset body, `JSON.stringify` (no spacing) for anything else. Streams, Blob,
 * ReadableStream, Response and `ctx.respond = false` are not bufferable; a body that
 * `JSON.stringify` makes nothing of is not sendable.
 */
export function captureResponse(ctx: Context): Captured {
  const res = ctx.res;
  // The handler bypassed Koa or wrote to ctx.res itself: the bytes are already gone.
  if (ctx.respond === false || res.headersSent || res.writableEnded) return UNBUFFERED;
  const status = ctx.status;

  if (EMPTY_STATUSES.has(status)) {
    // respond() drops the body and strips content-type/length here; do it now so the stored
    // headers are the sent ones.
    ctx.body = null;
    return { kind: 'bytes', body: EMPTY };
  }

  const body: unknown = ctx.body;
  // respond() ends a HEAD before it looks at the body, so nothing may be changed on ctx here
  // (the status text and its type, a Buffer's length would replace the handler's headers).
  if (ctx.method === 'HEAD') return captureHead(ctx, body);
  if (body === null || body === undefined) {
    if ((ctx.response as { _explicitNullBody?: boolean })._explicitNullBody === true) {
      // `ctx.body = null` with a status that allows a body: respond() sends an empty body and
      // strips these (Koa 3 also sets Content-Length: 0, which is never stored anyway).
      ctx.remove('Content-Type');
      ctx.remove('Transfer-Encoding');
      return { kind: 'bytes', body: EMPTY };
    }
    // Nothing set the body: respond() sends the status message (just the code on HTTP/2) as text.
    const text = ctx.req.httpVersionMajor >= 2 ? String(status) : ctx.message || String(status);
    ctx.type = 'text';
    return assign(ctx, status, Buffer.from(text));
  }
  if (Buffer.isBuffer(body)) return { kind: 'bytes', body };
  if (typeof body === 'string') return assign(ctx, status, Buffer.from(body));
  if (isUnbufferable(body)) return UNBUFFERED;

  // JSON.stringify throws on e.g. a BigInt: thrown here, a 500 as Koa's respond() would give.
  const json = JSON.stringify(body) as string | undefined;
  // JSON.stringify gives undefined for e.g. a function: Koa's respond() then throws
  // (Buffer.byteLength(undefined)) and answers 500. Left to Koa untouched, so it fails as it would
  // without the middleware; the key is freed as for any failed handler, not marked streamed (410).
  if (json === undefined) return UNSENDABLE;
  return assign(ctx, status, Buffer.from(json));
}

/**
 * A HEAD: respond() sends no body and only adds the Content-Length of a truthy body when none is
 * set (Koa's `response.length`), so that is all done here; the headers stay the handler's (its
 * Content-Length for a body it never sends, its type). Stored: the body a GET would get, so the
 * record can answer another method too; the middleware stores the HEAD's Content-Length as sent.
 */
function captureHead(ctx: Context, body: unknown): Captured {
  const lengthSet = ctx.res.hasHeader('content-length');
  let bytes: Buffer;
  if (body === null || body === undefined) bytes = EMPTY;
  else if (Buffer.isBuffer(body)) bytes = body;
  else if (typeof body === 'string') bytes = Buffer.from(body);
  else if (isUnbufferable(body)) return UNBUFFERED;
  else {
    let json: string | undefined;
    try {
      json = JSON.stringify(body);
    } catch (error) {
      // E.g. a BigInt with a Content-Length set: respond() never serialises it and answers, so
      // the handler answered: marked, never run again. Without one, Koa's length getter throws
      // the same error: a 500, and the key freed.
      if (lengthSet) return UNBUFFERED;
      throw error;
    }
    // A function: the same, with Buffer.byteLength(undefined) throwing in Koa's length getter.
    if (json === undefined) return lengthSet ? UNBUFFERED : UNSENDABLE;
    bytes = Buffer.from(json);
  }
  if (!lengthSet && body) ctx.length = bytes.byteLength;
  return { kind: 'bytes', body: bytes };
}

/** Replace the body by its bytes without letting Koa's setter change content-type or status. */
function assign(ctx: Context, status: number, bytes: Buffer): Captured {
  const hadType = ctx.res.hasHeader('content-type');
  ctx.body = bytes;
  // A Buffer body gets application/octet-stream when no type is set; keep "no type".
  if (!hadType) ctx.remove('Content-Type');
  // Assigning a body sets 200 unless the status was set explicitly (e.g. Koa's default 404).
  if (ctx.status !== status) ctx.status = status;
  return { kind: 'bytes', body: bytes };
}

/** Bodies respond() pipes instead of writing at once (same test as Koa's `is-stream`). */
function isUnbufferable(body: unknown): boolean {
  if (body instanceof Stream || body instanceof Blob || body instanceof ReadableStream || body instanceof Response) return true;
  const b = body as Partial<Record<'pipe' | 'read' | 'destroy', unknown>> & { readable?: unknown };
  return typeof body === 'object' && body !== null && Boolean(b.readable) && typeof b.pipe === 'function' && typeof b.read === 'function';
}
