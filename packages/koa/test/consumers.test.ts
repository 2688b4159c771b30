import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const pkgDir = fileURLToPath(new URL('..', import.meta.url));

/**
 * The built package as users load it: `require` and `import` of `@idemkit/koa` (self-reference
 * through package.json `exports`), each serving a real request through Koa.
 */
function run(args: string[]): string {
  if (!existsSync(new URL('../dist/index.cjs', import.meta.url)) || !existsSync(new URL('../dist/index.js', import.meta.url))) {
    throw new Error('dist/ is missing: run `pnpm --filter @idemkit/koa build` (pnpm test builds first).');
  }
  return execFileSync(process.execPath, args, { cwd: pkgDir, encoding: 'utf8' }).trim();
}

const SERVE = `
  const app = new Koa();
  app.use(idempotency({ store: createMemoryStore() }));
  app.use((ctx) => { ctx.status = 201; ctx.body = { ok: true }; });
  const server = app.listen(0, '127.0.0.1', async () => {
    const url = 'http://127.0.0.1:' + server.address().port;
    const send = () => fetch(url, { method: 'POST', headers: { 'idempotency-key': 'c1' } });
    const a = await send();
    const b = await send();
    console.log(JSON.stringify([a.status, b.status, b.headers.get('idempotent-replayed'), typeof IdempotencyError, IdempotencyError === CoreError]));
    server.close();
  });
`;
const EXPECTED = JSON.stringify([201, 201, 'true', 'function', true]);

describe('consumers of the built package', () => {
  it('CommonJS: require("@idemkit/koa")', () => {
    const code = `
      const Koa = require('koa');
      const { createMemoryStore, IdempotencyError: CoreError } = require('@idemkit/core');
      const { idempotency, IdempotencyError } = require('@idemkit/koa');
      ${SERVE}`;
    expect(run(['-e', code])).toBe(EXPECTED);
  });

  it('ESM: import from "@idemkit/koa"', () => {
    const code = `
      import Koa from 'koa';
      import { createMemoryStore, IdempotencyError as CoreError } from '@idemkit/core';
      import { idempotency, IdempotencyError } from '@idemkit/koa';
      ${SERVE}`;
    expect(run(['--input-type=module', '-e', code])).toBe(EXPECTED);
  });
});
