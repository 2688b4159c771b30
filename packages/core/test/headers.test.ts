import { describe, expect, it } from 'vitest';
import { hasRequestBody, mayHoldBodyKey, problemResponse, replayHeaders, RequestInProgressError, toStoredHeaders, snapshotHeaders, type OutgoingHeaderValue } from '../src/index.js';

describe('replayed headers', () => {
  it('recomputes content-length, except where a body is not allowed (1xx, 204, 304)', () => {
    const body = new Uint8Array([1, 2, 3]);
    expect(replayHeaders({ status: 200, headers: [], body }).get('content-length')).toBe('3');
    expect(replayHeaders({ status: 404, headers: [], body: new Uint8Array() }).get('content-length')).toBe('0');
    for (const status of [103, 204, 304]) {
      expect(replayHeaders({ status, headers: [], body: new Uint8Array() }).has('content-length'), String(status)).toBe(false);
    }
  });


  it('keeps end-to-end headers (multi-valued in order) and drops hop-by-hop, date and content-length', () => {
    const stored = toStoredHeaders({
      'Content-Type': 'application/json',
      'set-cookie': ['a=1', 'b=2'],
      location: '/orders/1',
      'x-count': 3,
      connection: 'keep-alive',
      'keep-alive': 'timeout=5',
      'transfer-encoding': 'chunked',
      date: 'Sat, 28 Nov 2026 10:00:00 GMT',
      'content-length': '12',
      'idempotent-replayed': 'true',
      absent: undefined,
    });
    expect(stored).toEqual([
      ['content-type', 'application/json'],
      ['set-cookie', 'a=1'],
      ['set-cookie', 'b=2'],
      ['location', '/orders/1'],
      ['x-count', '3'],
    ]);
    const replay = replayHeaders({ status: 201, headers: stored, body: new Uint8Array(7) });
    expect(replay.get('set-cookie')).toEqual(['a=1', 'b=2']);
    expect(replay.get('content-length')).toBe('7');
    expect(replay.get('idempotent-replayed')).toBe('true');
  });

  it("drops the headers the answer's Connection header names (RFC 9110 §7.6.1), in any case, from one or several values", () => {
    expect(toStoredHeaders({ connection: 'close, X-Hop', 'x-hop': '1', 'x-other': '2', 'x-kept': '3' })).toEqual([
      ['x-other', '2'],
      ['x-kept', '3'],
    ]);
    expect(toStoredHeaders({ Connection: ['keep-alive', ' x-a ,, X-B'], 'x-a': '1', 'X-B': '2', 'x-c': '3' })).toEqual([['x-c', '3']]);
  });

  it('keeps a content-length that went out with no body (lengthAsSent), and replays it as it is', () => {
    const headers = { 'content-length': '123', etag: '"v1"' };
    expect(toStoredHeaders(headers)).toEqual([['etag', '"v1"']]);
    const stored = toStoredHeaders(headers, undefined, true);
    expect(stored).toEqual([['content-length', '123'], ['etag', '"v1"']]);
    // A 304's, and a HEAD's 200 (stored without the body the length counts) replayed to a HEAD:
    // not recomputed.
    const empty = { headers: stored, body: new Uint8Array() };
    expect(replayHeaders({ status: 304, ...empty }).get('content-length')).toBe('123');
    expect(replayHeaders({ status: 200, ...empty }, true).get('content-length')).toBe('123');
    // The HEAD's 200 to any other method, which is sent the stored body: that body's length.
    expect(replayHeaders({ status: 200, ...empty }).get('content-length')).toBe('0');
  });

  it('problem responses carry the problem content type and the error headers', () => {
    const err = new RequestInProgressError('ERR_IDEMKIT_REQUEST_IN_PROGRESS', 409, 'busy', { headers: { 'Retry-After': '3' }, extensions: { retryAfter: 3 } });
    const res = problemResponse(err);
    expect(res.status).toBe(409);
    expect(res.headers).toEqual([['content-type', 'application/problem+json'], ['retry-after', '3']]);
    expect(JSON.parse(Buffer.from(res.body).toString())).toEqual({
      retryAfter: 3,
      type: 'https://idemkit.dev/problems/request-in-progress',
      title: 'A request with this idempotency key is in progress',
      status: 409,
      detail: 'busy',
      code: 'ERR_IDEMKIT_REQUEST_IN_PROGRESS',
    });
  });

  it('tells a request with a body (chunked or non-zero length) from one without', () => {
    expect(hasRequestBody({ 'content-length': '12' })).toBe(true);
    expect(hasRequestBody({ 'transfer-encoding': 'chunked' })).toBe(true);
    expect(hasRequestBody({ 'content-length': '0' })).toBe(false);
    expect(hasRequestBody({ 'content-length': 'abc' })).toBe(false);
    expect(hasRequestBody({})).toBe(false);
  });
});

describe('headers set before the key was claimed', () => {
  it('are not stored unless the handler changed them; of a list (Set-Cookie), only the values it added', () => {
    const live: Record<string, OutgoingHeaderValue> = { 'set-cookie': ['visit=1'], 'x-request-id': 'r1', 'cache-control': 'no-store' };
    const before = snapshotHeaders(live);
    // `cookies` and Fastify's reply.header('set-cookie') push into the array getHeaders() handed out.
    (live['set-cookie'] as string[]).push('order=1');
    live['cache-control'] = 'private';
    expect(toStoredHeaders(live, before)).toEqual([
      ['set-cookie', 'order=1'],
      ['cache-control', 'private'],
    ]);
    // A shallow copy would share the array, and the handler's cookie would never be stored.
    expect(toStoredHeaders(live, { ...live })).toEqual([]);
    // A value set twice counts twice: one of them is the handler's.
    expect(toStoredHeaders({ 'set-cookie': ['a=1', 'a=1'] }, snapshotHeaders({ 'set-cookie': 'a=1' }))).toEqual([['set-cookie', 'a=1']]);
  });

  it("of any other list the handler appended to (Link, Server-Timing), every value: a replay sets it whole, so the middleware's would be lost", () => {
    const before = snapshotHeaders({ link: '</app.css>; rel=preload', 'server-timing': ['mw;dur=1'] });
    const after = { link: ['</app.css>; rel=preload', '</order.js>; rel=preload'], 'server-timing': ['mw;dur=1', 'db;dur=4'] };
    expect(toStoredHeaders(after, before)).toEqual([
      ['link', '</app.css>; rel=preload'],
      ['link', '</order.js>; rel=preload'],
      ['server-timing', 'mw;dur=1'],
      ['server-timing', 'db;dur=4'],
    ]);
  });
});

describe('mayHoldBodyKey', () => {
  it('is true for bodies a key field could be in (JSON, forms), false for raw ones', () => {
    for (const type of ['application/json', 'application/vnd.api+json; charset=utf-8', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=X']) expect(mayHoldBodyKey(type), type).toBe(true);
    for (const type of ['application/xml', 'application/octet-stream', 'text/plain', undefined]) expect(mayHoldBodyKey(type), String(type)).toBe(false);
  });
});
