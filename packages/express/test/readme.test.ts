import type { Express } from 'express';
import { expectReadmePayments, importReadmeQuickStart } from '@idemkit/http-suite';
import { expect, it } from 'vitest';
import { listen } from './app.js';

/** Runs the README's quick start as written (see importReadmeQuickStart) against a real socket. */
it('README quick start runs as written: one charge, byte-identical replay, 422 on a changed body', async () => {
  const { app, cleanup } = await importReadmeQuickStart<Express>(new URL('../', import.meta.url), '@idemkit/express');
  const server = await listen(app);
  try {
    await expectReadmePayments(server.url);
    // Its last two curl lines: the handler's throw frees the key (idempotencyErrorHandler), so
    // the corrected request runs under the same key instead of getting the stored 400's 422.
    const pay = (amount: unknown): Promise<Response> =>
      fetch(`${server.url}/payments`, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': '51c0a2d9' }, body: JSON.stringify({ amount }) });
    expect((await pay('42')).status).toBe(400);
    // A POST without a body (Express 5 leaves req.body undefined) is the same 400, not a 500.
    const empty = await fetch(`${server.url}/payments`, { method: 'POST', headers: { 'idempotency-key': 'no-body' } });
    expect(empty.status).toBe(400);
    const fixed = await pay(42);
    expect(fixed.status).toBe(201);
    expect(await fixed.text()).toBe('{"id":"pay_2","amount":42}');
  } finally {
    await server.close();
    cleanup();
  }
});
