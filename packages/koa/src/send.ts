import { replayHeaders, type StoredResponse } from '@idemkit/core';
import type { Context } from 'koa';

/** A view on the stored bytes without copying them. */
export function toBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/**
 * Put a stored response (a replay or a problem) on `ctx` so Koa's respond() sends exactly these
 * bytes with exactly these headers.
 */
export function sendStored(ctx: Context, response: StoredResponse, headers: ReadonlyMap<string, string | string[]>): void {
  ctx.status = response.status;
  // Set by middleware before idempotency() (for this request, as for the original, which stored
  // it only if the handler changed it): kept. Only the type Koa's body setter makes up is removed.
  const typeBefore = ctx.res.hasHeader('Content-Type');
  // Assign the body first: Koa's body setter picks a content-type (octet-stream for a Buffer) when
  // none is set, and the stored headers set afterwards must win.
  ctx.body = toBuffer(response.body);
  if (!headers.has('content-type') && !typeBefore) ctx.remove('Content-Type');
  // Cookies are added to those earlier middleware set for this request (only the handler's own
  // were stored); every other stored header replaces its namesake.
  for (const [name, value] of headers) {
    if (name === 'set-cookie') ctx.append('Set-Cookie', value);
    else ctx.set(name, value);
  }
}

/**
 * Put a replay on `ctx`. To a HEAD, the stored Content-Length as it went out (see captureHead);
 * one that went out with none (no body) gets none, not the `0` Koa's respond() would make of the
 * empty stored body: an empty string is a body it adds no length for.
 */
export function sendReplay(ctx: Context, response: StoredResponse): void {
  const head = ctx.method === 'HEAD';
  const headers = replayHeaders(response, head);
  if (head && response.body.byteLength === 0 && !response.headers.some(([name]) => name === 'content-length')) {
    headers.delete('content-length');
    sendStored(ctx, response, headers);
    const typeSet = ctx.res.hasHeader('Content-Type');
    ctx.body = '';
    // The string setter adds a type and a length: neither went out with the original.
    if (!typeSet) ctx.remove('Content-Type');
    ctx.remove('Content-Length');
    return;
  }
  sendStored(ctx, response, headers);
}
