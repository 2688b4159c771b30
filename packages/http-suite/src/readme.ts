import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { expect } from 'vitest';

/**
 * Load a binding README's quick start as written: the block is saved in the package's `.tmp/` (so
 * the framework and `@idemkit/core` resolve as for a user), the binding's import points at its
 * source, and `app.listen(3000);` becomes `export { app };` so the test can listen on port 0.
 */
export async function importReadmeQuickStart<App>(packageRoot: URL, packageName: string): Promise<{ app: App; cleanup(): void }> {
  const readme = readFileSync(new URL('README.md', packageRoot), 'utf8');
  const block = /## Quick start\n+```ts\n([\s\S]*?)```/.exec(readme)?.[1];
  expect(block).toBeDefined();
  expect(block).toContain(`from '${packageName}';`);
  expect(block).toContain('app.listen(3000);');
  const source = block!.replace(`from '${packageName}';`, "from '../src/index.js';").replace('app.listen(3000);', 'export { app };');
  const dir = new URL('.tmp/', packageRoot);
  mkdirSync(dir, { recursive: true });
  writeFileSync(new URL('quick-start.ts', dir), source);
  const { app } = (await import(new URL('quick-start.ts', dir).href)) as { app: App };
  return { app, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/**
 * What the Express and Koa READMEs promise of their `POST /payments` quick start: one charge, a
 * byte-identical replay with `Idempotent-Replayed`, 422 for a changed body, 400 without a key.
 */
export async function expectReadmePayments(baseUrl: string): Promise<void> {
  const pay = (amount: number): Promise<Response> =>
    fetch(`${baseUrl}/payments`, {
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
  const keyless = await fetch(`${baseUrl}/payments`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"amount":1}' });
  expect(keyless.status).toBe(400);
  expect(keyless.headers.get('content-type')).toBe('application/problem+json');
}
