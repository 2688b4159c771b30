import { expect } from 'vitest';
import { expectProblem, newKey, storeId, type CaseContext } from './context.js';
import { keyHeaderBytes, rawRequest } from './http.js';

/** SPEC §2 rows: methods not covered, missing and invalid keys, key forms. */
export function keyCases(t: CaseContext): void {
  t.test('method not covered (GET) → passes through untouched', async () => {
    const app = await t.app();
    const key = newKey();
    const first = await app.send('/orders', { method: 'GET', key });
    const second = await app.send('/orders', { method: 'GET', key });
    expect(first.status).toBe(200);
    expect(first.json()).toEqual({ n: 1 });
    expect(second.json()).toEqual({ n: 2 });
    expect(second.replayed).toBe(false);
    expect(app.count('list')).toBe(2);
  });

  t.test('methods not covered by default (HEAD, PUT, DELETE) → no key needed, nothing stored, never replayed', async () => {
    const app = await t.app();
    const key = newKey();
    // HEAD /orders runs the GET /orders handler: without a key it is not a 400, with one it runs every time.
    const keyless = await app.send('/orders', { method: 'HEAD' });
    expect(keyless.status).toBe(200);
    for (let i = 0; i < 2; i++) {
      const head = await app.send('/orders', { method: 'HEAD', key });
      expect(head.status).toBe(200);
      expect(head.replayed).toBe(false);
    }
    expect(app.count('list')).toBe(3);
    // No route answers these: the framework's own 404/405, not the 400 of a covered method.
    for (const method of ['PUT', 'DELETE']) {
      const reply = await app.send('/orders', { method, json: { a: 1 } });
      expect(reply.status, `${method}: ${reply.text()}`).not.toBe(400);
      expect(reply.headers.get('content-type') ?? '').not.toMatch(/problem\+json/);
    }
    expect(await t.harness().store.get(storeId(key))).toBeUndefined();
  });

  t.test('configured methods replace the defaults: GET covered (a GET and a POST under one key are two requests: 422), PATCH no longer', async () => {
    const app = await t.app({ methods: ['POST', 'GET'] });
    const key = newKey();
    const first = await app.send('/orders', { method: 'GET', key });
    expect(first.json()).toEqual({ n: 1 });
    const replay = await app.send('/orders', { method: 'GET', key });
    expect(replay.replayed).toBe(true);
    expect(replay.body).toEqual(first.body);
    // Same path, no body either: only the method tells them apart, and it is part of the fingerprint.
    expectProblem(await app.send('/orders', { method: 'POST', key }), 422, 'ERR_IDEMKIT_FINGERPRINT_MISMATCH');
    expect(app.count('list')).toBe(1);
    expect(app.count('orders')).toBe(0);
    // PATCH is not in the list: it passes through, key or not.
    const patchKey = newKey();
    for (let i = 1; i <= 2; i++) {
      const patch = await app.send('/orders/o-1', { method: 'PATCH', key: patchKey, json: { qty: 3 } });
      expect(patch.json()).toEqual({ id: 'o-1', n: i, body: { qty: 3 } });
      expect(patch.replayed).toBe(false);
    }
    expect(await t.harness().store.get(storeId(patchKey))).toBeUndefined();
  });

  t.test('no key → 400 problem+json, handler not run', async () => {
    const app = await t.app();
    const reply = await app.post('/orders', { json: { a: 1 } });
    expectProblem(reply, 400, 'ERR_IDEMKIT_KEY_MISSING');
    expect(app.count('orders')).toBe(0);
  });

  t.test('no key with required: false → passes through, runs every time', async () => {
    const app = await t.app({ required: false });
    const first = await app.post('/orders', { json: { a: 1 } });
    const second = await app.post('/orders', { json: { a: 1 } });
    expect(first.status).toBe(201);
    expect(second.status).toBe(201);
    expect(second.replayed).toBe(false);
    expect(app.count('orders')).toBe(2);
  });

  t.test('invalid keys (empty, 256 chars, control char) → 400 problem+json', async () => {
    const app = await t.app();
    // A tab inside the value is the one control character HTTP/1.1 carries in a header value.
    for (const key of ['', 'x'.repeat(256), 'ab\tcd']) {
      const reply = await app.post('/orders', { key, json: { a: 1 } });
      expectProblem(reply, 400, 'ERR_IDEMKIT_KEY_INVALID');
    }
    // 255 characters is still fine.
    const ok = await app.post('/orders', { key: 'y'.repeat(255), json: { a: 1 } });
    expect(ok.status).toBe(201);
    expect(app.count('orders')).toBe(1);
  });

  t.test('a custom header name and a custom validator (validateKey) are applied by the binding', async () => {
    const app = await t.app({ header: 'X-Request-Key', validateKey: (key) => key.startsWith('k-') || 'must start with k-' });
    const key = newKey();
    const first = await app.post('/orders', { headers: { 'x-request-key': key }, json: { a: 1 } });
    const replay = await app.post('/orders', { headers: { 'x-request-key': key }, json: { a: 1 } });
    expect(first.status).toBe(201);
    expect(replay.replayed).toBe(true);
    // The default header is not read any more: no key.
    expectProblem(await app.post('/orders', { key, json: { a: 1 } }), 400, 'ERR_IDEMKIT_KEY_MISSING');
    // The validator's message is the problem's detail.
    const refused = expectProblem(await app.post('/orders', { headers: { 'x-request-key': 'nope' }, json: { a: 1 } }), 400, 'ERR_IDEMKIT_KEY_INVALID');
    expect(refused.detail).toContain('must start with k-');
    expect(app.count('orders')).toBe(1);
  });

  t.test('a custom getKey gets the framework request: its key replays and passes the built-in rules; the key header is not read', async () => {
    const app = await t.app({}, { keyFrom: 'x-alt-key' });
    const key = newKey();
    const first = await app.post('/orders', { headers: { 'x-alt-key': key }, json: { a: 1 } });
    const replay = await app.post('/orders', { headers: { 'x-alt-key': key }, json: { a: 1 } });
    expect(first.status).toBe(201);
    expect(replay.replayed).toBe(true);
    expect(replay.body).toEqual(first.body);
    // getKey replaces the header (and body field) lookup: with it answering undefined, there is no key.
    expectProblem(await app.post('/orders', { key, json: { a: 1 } }), 400, 'ERR_IDEMKIT_KEY_MISSING');
    // What it returns is held to the same rules as a header key.
    expectProblem(await app.post('/orders', { headers: { 'x-alt-key': 'x'.repeat(256) }, json: { a: 1 } }), 400, 'ERR_IDEMKIT_KEY_INVALID');
    expect(app.count('orders')).toBe(1);
  });

  t.test('non-ASCII key bytes and several Idempotency-Key headers → 400 problem+json', async () => {
    const app = await t.app();
    // Raw UTF-8 bytes on the wire (Node reads header bytes as latin1, so they arrive as non-ASCII characters).
    const nonAscii = await rawRequest(app.url, '/orders', [keyHeaderBytes(Buffer.from(`café-${newKey()}`, 'utf8'))]);
    expect(nonAscii.status).toBe(400);
    expect(nonAscii.rest).toMatch(/content-type: application\/problem\+json/i);
    expect(nonAscii.rest).toContain('"code":"ERR_IDEMKIT_KEY_INVALID"');

    const several = await rawRequest(app.url, '/orders', [
      keyHeaderBytes(Buffer.from(newKey())),
      keyHeaderBytes(Buffer.from(newKey())),
    ]);
    expect(several.status).toBe(400);
    expect(several.rest).toContain('"code":"ERR_IDEMKIT_KEY_INVALID"');
    // Node joins the two lines with ", " before any binding sees them: the detail names that case.
    expect(several.rest).toContain('several Idempotency-Key headers');
    expect(app.count('orders')).toBe(0);
  });

  t.test('sf-string key ("abc") and bare key (abc) address the same record', async () => {
    const app = await t.app();
    const key = newKey();
    const first = await app.post('/orders', { key: `"${key}"`, json: { a: 1 } });
    const second = await app.post('/orders', { key, json: { a: 1 } });
    expect(first.status).toBe(201);
    expect(second.status).toBe(201);
    expect(second.replayed).toBe(true);
    expect(second.body).toEqual(first.body);
    expect(app.count('orders')).toBe(1);
  });

  t.test('key in the body field (POST /create { idempotencyKey, data }) → replays', async () => {
    const app = await t.app();
    const body = { idempotencyKey: newKey(), data: { sku: 'A-1', qty: 2 } };
    const first = await app.post('/create', { json: body });
    const second = await app.post('/create', { json: body });
    expect(first.status).toBe(201);
    expect(first.json()).toMatchObject({ data: body.data });
    expect(second.replayed).toBe(true);
    expect(second.body).toEqual(first.body);
    expect(app.count('create')).toBe(1);
  });
}
