import { problemResponse, replayHeaders, responseHeaders, type IdempotencyError, type StoredResponse } from '@idemkit/core';
import type { Response } from 'express';
import { runHeadListeners, skipHeadListeners } from './capture.js';

/** A stored response, exactly: status, its headers (plus content-length and Idempotent-Replayed), the bytes. */
export function writeReplay(res: Response, response: StoredResponse): void {
  // A HEAD's stored Content-Length only to a HEAD: any other method is sent the stored body.
  const head = res.req.method === 'HEAD';
  const headers = replayHeaders(response, head);
  // A HEAD that went out with none (`res.end()`: Node sends neither it nor Transfer-Encoding) has
  // none stored and an empty body: it gets none, not the `0` of that body. One with a body and
  // none stored (res.send() before its length was stored) still gets the body's length.
  if (head && response.body.byteLength === 0 && !response.headers.some(isLength)) headers.delete('content-length');
  writeRaw(res, response.status, headers, response.body, true);
}

const isLength = ([name]: readonly [string, string]): boolean => name === 'content-length';

/** The core's problem bytes, so every binding answers byte-identical problems. */
export function writeProblem(res: Response, error: IdempotencyError): void {
  const problem = problemResponse(error);
  writeRaw(res, problem.status, responseHeaders(problem), problem.body);
}

/**
 * Through Node's own methods rather than `res.send`: no ETag, no charset rewrite, no 304
 * freshness check, so the bytes and headers are exactly the stored ones.
 */
function writeRaw(res: Response, status: number, headers: Map<string, string | string[]>, body: Uint8Array, replay = false): void {
  res.statusCode = status;
  // Cookies are added to those earlier middleware set for this request (only the handler's own
  // were stored); every other stored header replaces its namesake.
  for (const [name, value] of headers) if (name !== 'set-cookie') res.setHeader(name, value);
  const cookies = headers.get('set-cookie');
  if (cookies === undefined) return void res.end(Buffer.from(body.buffer, body.byteOffset, body.byteLength));
  // After the cookies that middleware sets as the head is written, as a browser keeps the last of
  // a name: express-session (saveUninitialized, its default) gives a cookieless retry a new empty
  // session's cookie, which came after the stored one and logged the client out of the session
  // the replayed login made.
  if (replay) runHeadListeners(res, body.byteLength);
  // One Set-Cookie per cookie (RFC 6265 4.1.1): the retry's own of a cookie the stored answer
  // sets (that new empty session's) is dropped, else the replay carried the name twice, which
  // the first answer never did and a client that keeps the first of a name reads wrongly.
  const stored = new Set((Array.isArray(cookies) ? cookies : [cookies]).map(cookieIdentity));
  const own = res.getHeader('set-cookie');
  if (own !== undefined) {
    const kept = (Array.isArray(own) ? own : [String(own)]).filter((c) => !stored.has(cookieIdentity(c)));
    if (kept.length > 0) res.setHeader('set-cookie', kept);
    else res.removeHeader('set-cookie');
  }
  res.appendHeader('set-cookie', cookies);
  if (replay) skipHeadListeners(res);
  res.end(Buffer.from(body.buffer, body.byteOffset, body.byteLength));
}

/** What a client stores a cookie under: its name, Domain and Path (RFC 6265 5.3). */
function cookieIdentity(cookie: string): string {
  const [pair = '', ...attributes] = cookie.split(';');
  const attribute = (name: string): string =>
    attributes
      .map((a) => a.trim())
      .findLast((a) => a.slice(0, name.length + 1).toLowerCase() === `${name}=`)
      ?.slice(name.length + 1) ?? '';
  return [pair.split('=')[0]!.trim(), attribute('domain').toLowerCase().replace(/^\./, ''), attribute('path')].join('\n');
}
