import { expect } from 'vitest';
import { expectProblem, newKey, type CaseContext } from './context.js';

/** SPEC §2 rows: released on throw / unstorable status; stored 4xx; unbuffered responses. */
export function releaseCases(t: CaseContext): void {
  t.test('a 500 answer releases the key: the retry runs again', async () => {
    const app = await t.app();
    const key = newKey();
    const first = await app.post('/orders?status=500', { key });
    expect(first.status).toBe(500);
    // Not stored, but delivered unchanged: the handler's body and headers, both cookies.
    expect(first.json()).toMatchObject({ n: 1, body: {} });
    expect(first.headers.get('x-custom')).toBe('yes');
    expect(first.headers.getSetCookie()).toEqual(['a=1', 'b=2']);
    const retry = await app.post('/orders?status=500', { key });
    expect(retry.status).toBe(500);
    expect(retry.replayed).toBe(false);
    expect(retry.json()).toMatchObject({ n: 2 });
    expect(app.count('orders')).toBe(2);
  });

  t.test('a thrown error releases the key: the retry runs again', async () => {
    const app = await t.app();
    const key = newKey();
    const first = await app.post('/throw', { key });
    expect(first.status).toBe(500);
    const retry = await app.post('/throw', { key });
    expect(retry.status).toBe(500);
    expect(retry.replayed).toBe(false);
    expect(app.count('throw')).toBe(2);
  });

  t.test('a thrown error the framework answers with a storable status (400) releases the key too: the retry runs again', async () => {
    // A 500 is released for its status alone: only a thrown 4xx tells a throw from an answer.
    const app = await t.app();
    const key = newKey();
    const first = await app.post('/throw?status=400', { key });
    expect(first.status).toBe(400);
    const retry = await app.post('/throw?status=400', { key });
    expect(retry.status).toBe(400);
    expect(retry.replayed).toBe(false);
    expect(app.count('throw')).toBe(2);
  });

  for (const status of [400, 404]) {
    t.test(`a ${status} answer is stored and replayed`, async () => {
      const app = await t.app();
      const key = newKey();
      const first = await app.post(`/orders?status=${status}`, { key });
      expect(first.status).toBe(status);
      const replay = await app.post(`/orders?status=${status}`, { key });
      expect(replay.status).toBe(status);
      expect(replay.replayed).toBe(true);
      expect(replay.body).toEqual(first.body);
      expect(app.count('orders')).toBe(1);
    });
  }

  // SPEC §2: every status below 500 is stored except these four.
  for (const status of [408, 409, 425, 429]) {
    t.test(`a ${status} answer is not stored: the retry runs again`, async () => {
      const app = await t.app();
      const key = newKey();
      expect((await app.post(`/orders?status=${status}`, { key })).status).toBe(status);
      const retry = await app.post(`/orders?status=${status}`, { key });
      expect(retry.status).toBe(status);
      expect(retry.replayed).toBe(false);
      expect(app.count('orders')).toBe(2);
    });
  }

  t.test('streamed response: delivered unchanged; the retry gets 410 response-not-replayable, handler not re-run', async () => {
    const app = await t.app();
    const key = newKey();
    const first = await app.post('/stream', { key });
    expect(first.status).toBe(200);
    expect(first.text()).toBe('abc');
    expect(first.headers.get('content-type')).toMatch(/^text\/plain/);
    const problem = expectProblem(await app.post('/stream', { key }), 410, 'ERR_IDEMKIT_RESPONSE_NOT_REPLAYABLE');
    expect(problem).toMatchObject({ originalStatus: 200, reason: 'not-bufferable' });
    expect(app.count('stream')).toBe(1);
  });

  t.test('body over maxBodyBytes: delivered unchanged; the retry gets 410, handler not re-run; under the limit replays', async () => {
    const app = await t.app({ maxBodyBytes: 1024 });
    const key = newKey();
    const first = await app.post('/large?size=4096', { key });
    expect(first.status).toBe(200);
    expect(first.body).toEqual(new Uint8Array(4096).fill(0x61));
    const problem = expectProblem(await app.post('/large?size=4096', { key }), 410, 'ERR_IDEMKIT_RESPONSE_NOT_REPLAYABLE');
    expect(problem).toMatchObject({ originalStatus: 200, reason: 'too-large' });
    expect(app.count('large')).toBe(1);

    const small = newKey();
    const fits = await app.post('/large?size=1024', { key: small });
    const replay = await app.post('/large?size=1024', { key: small });
    expect(replay.replayed).toBe(true);
    expect(replay.body).toEqual(fits.body);
    expect(app.count('large')).toBe(2);
  });

  t.test('default maxBodyBytes is 1 MiB: a 1 MiB body replays, one byte more gets 410 too-large', async () => {
    const app = await t.app();
    const fits = newKey();
    const first = await app.post('/large?size=1048576', { key: fits });
    expect(first.status).toBe(200);
    const replay = await app.post('/large?size=1048576', { key: fits });
    expect(replay.replayed).toBe(true);
    // Buffer.equals, not toEqual: a deep compare of 1 MiB element by element takes seconds, long
    // enough for the server to close the idle keep-alive socket under the next request.
    expect(Buffer.from(replay.body).equals(first.body)).toBe(true);
    const over = newKey();
    const big = await app.post('/large?size=1048577', { key: over });
    expect(big.body.byteLength).toBe(1_048_577);
    const problem = expectProblem(await app.post('/large?size=1048577', { key: over }), 410, 'ERR_IDEMKIT_RESPONSE_NOT_REPLAYABLE');
    expect(problem).toMatchObject({ originalStatus: 200, reason: 'too-large' });
    expect(app.count('large')).toBe(2);
  });
}
