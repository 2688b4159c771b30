import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import type { Express } from 'express';
import { afterAll, expect, it } from 'vitest';
import { listen } from './app.js';

const dir = new URL('../.tmp/', import.meta.url);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/**
 * Runs the README's quick start as written: the block is saved next to the package (so `express`
 * and `@idemkit/core` resolve as for a user), `@idemkit/express` points at the source, and
 * `app.listen(3000)` becomes an export so the test listens on 127.0.0.1:0.
 */
it('README quick start runs as written: one charge, byte-identical replay, 422 on a changed body', async () => {
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
  const block = /## Quick start\n+```ts\n([\s\S]*?)```/.exec(readme)?.[1];
  expect(block).toBeDefined();
  expect(block).toContain("from '@idemkit/express';");
  expect(block).toContain('app.listen(3000);');
  const source = block!.replace("from '@idemkit/express';", "from '../src/index.js';").replace('app.listen(3000);', 'export { app };');
  mkdirSync(dir, { recursive: true });
  writeFileSync(new URL('quick-start.ts', dir), source);
  const { app } = (await import(new URL('quick-start.ts', dir).href)) as { app: Express };
  const server = await listen(app);
  try {
    const pay = (amount: number): Promise<Response> =>
      fetch(`${server.url}/payments`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': '8e03978e' },
        body: JSON.stringify({ amount }),
      });
    const first = await pay(4200);
    const firstBody = await first.text();
    expect(first.status).toBe(201);
    expect(firstBody).toBe('{"id":"pay_1","amount":4200}');
    const replay = await pay(4200);
    expect(replay.status).toBe(201);
    expect(await replay.text()).toBe(firstBody);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(replay.headers.get('location')).toBe('/payments/pay_1');
    expect(replay.headers.get('content-type')).toBe(first.headers.get('content-type'));
    expect((await pay(1)).status).toBe(422);
    const keyless = await fetch(`${server.url}/payments`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"amount":1}' });
    expect(keyless.status).toBe(400);
    expect(keyless.headers.get('content-type')).toBe('application/problem+json');
  } finally {
    await server.close();
  }
});
