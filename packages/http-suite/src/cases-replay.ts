import { UNREPLAYED_HEADERS, type IdempotencyStore } from '@idemkit/core';
import { expect } from 'vitest';
import { expectProblem, newKey, storeId, type CaseContext } from './context.js';

/** SPEC §2 rows: first request, replay byte for byte, fingerprint mismatch, body kinds. */
export function replayCases(t: CaseContext): void {
  t.test('first request runs once, response unchanged; replay is byte-exact with Idempotent-Replayed', async () => {
    const app = await t.app();
    const key = newKey();
    const first = await app.post('/orders', { key, json: { sku: 'A-1', qty: 2 } });
    expect(first.status).toBe(201);
    expect(first.replayed).toBe(false);
    expect(first.headers.get('idempotent-replayed')).toBeNull();
    const body = first.json() as { id: string; n: number; body: unknown };
    expect(body).toMatchObject({ n: 1, body: { sku: 'A-1', qty: 2 } });
    expect(first.headers.get('location')).toBe(`/orders/${body.id}`);
    expect(first.headers.get('x-custom')).toBe('yes');
    expect(first.headers.getSetCookie()).toEqual(['a=1', 'b=2']);

    const replay = await app.post('/orders', { key, json: { sku: 'A-1', qty: 2 } });
    expect(replay.status).toBe(201);
    expect(replay.replayed).toBe(true);
    expect(replay.body).toEqual(first.body);
    expect(replay.headers.get('location')).toBe(first.headers.get('location'));
    expect(replay.headers.get('x-custom')).toBe('yes');
    expect(replay.headers.getSetCookie()).toEqual(['a=1', 'b=2']);
    expect(replay.headers.get('content-type')).toBe(first.headers.get('content-type'));
    expect(replay.headers.get('content-length')).toBe(String(first.body.byteLength));
    expect(app.count('orders')).toBe(1);

    // What was stored: end-to-end headers only, no Date (the replay gets its own), no hop-by-hop.
    const record = await t.harness().store.get(storeId(key));
    expect(record?.state).toBe('completed');
    const storedNames = record?.response?.headers.map(([name]) => name) ?? [];
    expect(storedNames).toEqual(expect.arrayContaining(['location', 'x-custom', 'set-cookie', 'content-type']));
    for (const name of storedNames) expect(UNREPLAYED_HEADERS.has(name), name).toBe(false);
    // The replay's Date is one fresh value, never a copy stacked on top of the server's own.
    expect(replay.headers.get('date')).toMatch(/^[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$/);
  });

  t.test('with localCache, replays come from the process: the same bytes as from the store, and no store call', async () => {
    let begins = 0;
    const app = await t.app({ localCache: true }, { store: countingBegins(t.harness().store, () => begins++) });
    const key = newKey();
    const first = await app.post('/orders', { key, json: { sku: 'A-1', qty: 2 } });
    expect(first.status).toBe(201);
    for (let i = 0; i < 3; i++) {
      const replay = await app.post('/orders', { key, json: { sku: 'A-1', qty: 2 } });
      expect(replay.status).toBe(201);
      expect(replay.replayed).toBe(true);
      expect(replay.body).toEqual(first.body);
      expect(replay.headers.get('location')).toBe(first.headers.get('location'));
      expect(replay.headers.getSetCookie()).toEqual(['a=1', 'b=2']);
      expect(replay.headers.get('content-type')).toBe(first.headers.get('content-type'));
    }
    // Another body under the cached key is still refused, from the process too.
    expectProblem(await app.post('/orders', { key, json: { sku: 'B-2' } }), 422, 'ERR_IDEMKIT_FINGERPRINT_MISMATCH');
    expect(begins).toBe(1);
    expect(app.count('orders')).toBe(1);
  });

  t.test("a header middleware before idempotency sets per request (a request id, CORS) is the retry's own on a replay", async () => {
    const app = await t.app();
    const key = newKey();
    const first = await app.post('/orders', { key, json: { sku: 'A-1' } });
    expect(first.status).toBe(201);
    const firstArrival = Number(first.headers.get('x-arrival'));
    expect(firstArrival).toBeGreaterThan(0);
    const replay = await app.post('/orders', { key, json: { sku: 'A-1' } });
    expect(replay.replayed).toBe(true);
    // Before, the stored copy (the first request's) overwrote the one set for the retry.
    expect(Number(replay.headers.get('x-arrival'))).toBe(firstArrival + 1);
    expect(replay.headers.get('x-custom')).toBe('yes');
    const record = await t.harness().store.get(storeId(key));
    expect(record?.response?.headers.map(([name]) => name)).not.toContain('x-arrival');
  });

  t.test("a cookie middleware before idempotency sets is the retry's own on a replay; the handler's cookies are replayed beside it", async () => {
    const app = await t.app();
    const key = newKey();
    const headers = { 'x-outer-cookie': '1' };
    const first = await app.post('/orders', { key, json: { sku: 'A-1' }, headers });
    const n = Number(first.headers.get('x-arrival'));
    expect(first.headers.getSetCookie()).toEqual([`arrival=${n}`, 'a=1', 'b=2']);
    const replay = await app.post('/orders', { key, json: { sku: 'A-1' }, headers });
    expect(replay.replayed).toBe(true);
    // Before: the first request's arrival cookie came back beside (or over) the retry's own, or,
    // where the cookie array grew in place, the handler's cookies were not stored at all.
    expect(replay.headers.getSetCookie()).toEqual([`arrival=${n + 1}`, 'a=1', 'b=2']);
    const record = await t.harness().store.get(storeId(key));
    expect(record?.response?.headers.filter(([name]) => name === 'set-cookie').map(([, value]) => value)).toEqual(['a=1', 'b=2']);
  });

  t.test('a 204 replays as a 204: no body and, as on the original, no Content-Length', async () => {
    const app = await t.app();
    const key = newKey();
    const first = await app.post('/orders?status=204', { key, json: { sku: 'A-1' } });
    expect(first.status).toBe(204);
    expect(first.headers.get('content-length')).toBeNull();
    const replay = await app.post('/orders?status=204', { key, json: { sku: 'A-1' } });
    expect(replay.status).toBe(204);
    expect(replay.replayed).toBe(true);
    expect(replay.body.byteLength).toBe(0);
    // RFC 9110 §8.6: a 204 carries no Content-Length.
    expect(replay.headers.get('content-length')).toBeNull();
    expect(app.count('orders')).toBe(1);
  });

  t.test('a 204 is stored as it went out, without the payload the handler gave it: not too large for maxBodyBytes', async () => {
    // The handler sends its JSON body (far over 16 bytes) with the 204; no framework sends it.
    // (A 304 goes out with the length of that payload on Fastify: see the next case.)
    const app = await t.app({ maxBodyBytes: 16 });
    const key = newKey();
    const first = await app.post('/orders?status=204', { key, json: { sku: 'A-1' } });
    expect(first.status).toBe(204);
    expect(first.body.byteLength).toBe(0);
    const replay = await app.post('/orders?status=204', { key, json: { sku: 'A-1' } });
    // Before, Fastify stored the dropped payload: over maxBodyBytes, its retries got 410 too-large.
    expect(replay.status, replay.text()).toBe(204);
    expect(replay.replayed).toBe(true);
    expect(replay.body.byteLength).toBe(0);
    // Nor a type the original did not have (Fastify sends a 204 that had a payload without one).
    expect(replay.headers.get('content-type')).toBe(first.headers.get('content-type'));
    const record = await t.harness().store.get(storeId(key));
    expect(record?.response?.body.byteLength).toBe(0);
    expect(app.count('orders')).toBe(1);
  });

  t.test('a 304 sent with a payload over maxBodyBytes is stored as it went out (no body, its Content-Length) and replays', async () => {
    // Node writes no body for a 304; Fastify sends the Content-Length of the payload with it.
    const app = await t.app({ maxBodyBytes: 16 });
    const key = newKey();
    const first = await app.post('/orders?status=304', { key, json: { sku: 'A-1' } });
    expect(first.status).toBe(304);
    expect(first.body.byteLength).toBe(0);
    const replay = await app.post('/orders?status=304', { key, json: { sku: 'A-1' } });
    // Before, Fastify stored the payload for the replay to work the length out again: over
    // maxBodyBytes, its retries got 410 too-large, for an answer that went out with no body.
    expect(replay.status, replay.text()).toBe(304);
    expect(replay.replayed).toBe(true);
    expect(replay.body.byteLength).toBe(0);
    expect(replay.headers.get('content-length')).toBe(first.headers.get('content-length'));
    expect(replay.headers.get('content-type')).toBe(first.headers.get('content-type'));
    expect(replay.headers.get('location')).toBe(first.headers.get('location'));
    const record = await t.harness().store.get(storeId(key));
    expect(record?.response?.body.byteLength).toBe(0);
    expect(app.count('orders')).toBe(1);
  });

  t.test('headers the answer\'s Connection header names (Connection: close, X-Hop) are hop-by-hop: neither stored nor replayed', async () => {
    const app = await t.app();
    const key = newKey();
    const first = await app.post('/orders?hop=1', { key, json: { sku: 'A-1' } });
    expect(first.status).toBe(201);
    // The first answer carries it (Node sends what the handler set; a proxy would drop it).
    expect(first.headers.get('x-hop')).toBe('1');
    const replay = await app.post('/orders?hop=1', { key, json: { sku: 'A-1' } });
    expect(replay.replayed).toBe(true);
    expect(replay.body).toEqual(first.body);
    // Before, only the fixed hop-by-hop list was dropped: X-Hop was stored and replayed, without
    // the Connection header that made it hop-by-hop.
    expect(replay.headers.get('x-hop')).toBeNull();
    expect(replay.headers.get('x-custom')).toBe('yes');
    const record = await t.harness().store.get(storeId(key));
    const storedNames = record?.response?.headers.map(([name]) => name) ?? [];
    expect(storedNames).toContain('x-custom');
    expect(storedNames).not.toContain('x-hop');
    expect(storedNames).not.toContain('connection');
    expect(app.count('orders')).toBe(1);
  });

  t.test('HEAD, when covered: the replay has the Content-Length the original had (its body never goes out)', async () => {
    const app = await t.app({ methods: ['POST', 'PATCH', 'HEAD'] });
    const key = newKey();
    // HEAD /orders runs the GET /orders handler, which answers JSON { n }.
    const first = await app.send('/orders', { method: 'HEAD', key });
    expect(first.status).toBe(200);
    expect(first.body.byteLength).toBe(0);
    expect(first.headers.get('content-length')).toBe(String(JSON.stringify({ n: 1 }).length));
    const replay = await app.send('/orders', { method: 'HEAD', key });
    expect(replay.status).toBe(200);
    expect(replay.replayed).toBe(true);
    expect(replay.body.byteLength).toBe(0);
    // Before, Express stored the empty body its send() ends a HEAD with, so its replay said 0.
    expect(replay.headers.get('content-length')).toBe(first.headers.get('content-length'));
    expect(replay.headers.get('content-type')).toBe(first.headers.get('content-type'));
    expect(app.count('list')).toBe(1);
  });

  t.test('same key, different body or path → 422 problem, handler not run, original still replays', async () => {
    const app = await t.app();
    const key = newKey();
    const first = await app.post('/orders', { key, json: { sku: 'A-1' } });
    expect(first.status).toBe(201);

    expectProblem(await app.post('/orders', { key, json: { sku: 'B-2' } }), 422, 'ERR_IDEMKIT_FINGERPRINT_MISMATCH');
    expectProblem(await app.post('/orders?other=1', { key, json: { sku: 'A-1' } }), 422, 'ERR_IDEMKIT_FINGERPRINT_MISMATCH');
    expect(app.count('orders')).toBe(1);

    const replay = await app.post('/orders', { key, json: { sku: 'A-1' } });
    expect(replay.replayed).toBe(true);
    expect(replay.body).toEqual(first.body);
  });

  t.test('same key, different text/plain body → 422 (a raw body is fingerprinted by its bytes)', async () => {
    const app = await t.app();
    const key = newKey();
    const first = await app.post('/text', { key, text: 'first body' });
    expect(first.status).toBe(200);
    expectProblem(await app.post('/text', { key, text: 'other body' }), 422, 'ERR_IDEMKIT_FINGERPRINT_MISMATCH');
    const replay = await app.post('/text', { key, text: 'first body' });
    expect(replay.replayed).toBe(true);
    expect(replay.body).toEqual(first.body);
    expect(app.count('text')).toBe(1);
  });

  t.test('JSON key order does not change the fingerprint', async () => {
    const app = await t.app();
    const key = newKey();
    await app.post('/orders', { key, json: { a: 1, b: 2 } });
    const reordered = await app.post('/orders', { key, json: { b: 2, a: 1 } });
    expect(reordered.replayed).toBe(true);
    expect(app.count('orders')).toBe(1);
  });

  t.test('binary body replays byte-exact', async () => {
    const app = await t.app();
    const key = newKey();
    const first = await app.post('/binary', { key });
    const expected = Uint8Array.from({ length: 256 }, (_, i) => i);
    expect(first.status).toBe(200);
    expect(first.body).toEqual(expected);
    expect(first.headers.get('content-type')).toMatch(/^application\/octet-stream/);
    const replay = await app.post('/binary', { key });
    expect(replay.replayed).toBe(true);
    expect(replay.body).toEqual(expected);
    expect(replay.headers.get('content-type')).toBe(first.headers.get('content-type'));
    expect(app.count('binary')).toBe(1);
  });

  t.test('text body replays byte-exact', async () => {
    const app = await t.app();
    const key = newKey();
    const text = 'plain text, ünïcödé ✓\nsecond line';
    const first = await app.post('/text', { key, text });
    expect(first.status).toBe(200);
    expect(first.text()).toBe(text);
    expect(first.headers.get('content-type')).toMatch(/^text\/plain/);
    const replay = await app.post('/text', { key, text });
    expect(replay.replayed).toBe(true);
    expect(replay.body).toEqual(first.body);
    expect(replay.headers.get('content-type')).toBe(first.headers.get('content-type'));
    expect(app.count('text')).toBe(1);
  });

  t.test('PATCH is covered: runs once, then replays', async () => {
    const app = await t.app();
    const key = newKey();
    const first = await app.send('/orders/o-1', { method: 'PATCH', key, json: { qty: 3 } });
    expect(first.status).toBe(200);
    expect(first.json()).toEqual({ id: 'o-1', n: 1, body: { qty: 3 } });
    const replay = await app.send('/orders/o-1', { method: 'PATCH', key, json: { qty: 3 } });
    expect(replay.replayed).toBe(true);
    expect(replay.body).toEqual(first.body);
    expect(app.count('patch')).toBe(1);
  });
}

/** The store as it is, with each `begin` counted: what the local cache spares it. */
function countingBegins(store: IdempotencyStore, count: () => void): IdempotencyStore {
  return new Proxy(store, {
    get(target, name) {
      const value: unknown = Reflect.get(target, name, target);
      if (typeof value !== 'function') return value;
      if (name !== 'begin') return value.bind(target);
      return (...args: unknown[]) => {
        count();
        return value.apply(target, args);
      };
    },
  });
}

