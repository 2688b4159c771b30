import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const pkgDir = fileURLToPath(new URL('..', import.meta.url));

/**
 * An app that loads this package twice, as Node does when one file `import`s it and another
 * `require`s it (an ESM app with a CommonJS router or error module): two copies of the module,
 * `dist/index.js` and `dist/index.cjs`. Each builds half of the app.
 */
function run(code: string): unknown {
  if (!existsSync(new URL('../dist/index.cjs', import.meta.url)) || !existsSync(new URL('../dist/index.js', import.meta.url))) {
    throw new Error('dist/ is missing: run `pnpm --filter @idemkit/express build` (pnpm test builds first).');
  }
  const script = `
    import { createRequire } from 'node:module';
    import express from 'express';
    import { createMemoryStore } from '@idemkit/core';
    import * as esm from '@idemkit/express';
    const cjs = createRequire(process.cwd() + '/')('@idemkit/express');
    const store = createMemoryStore();
    const app = express();
    app.use(express.json());
    let runs = 0;
    ${code}
    app.use((err, _req, res, _next) => void res.status(err.status ?? 500).json({ error: err.message }));
    const server = app.listen(0, '127.0.0.1', async () => {
      const url = 'http://127.0.0.1:' + server.address().port;
      const send = (key) => fetch(url + '/orders', { method: 'POST', headers: { 'idempotency-key': key } }).then((r) => r.status, () => 'cut');
      const statuses = [await send('k1'), await send('k1')];
      console.log(JSON.stringify({ statuses, runs }));
      server.close();
    });`;
  return JSON.parse(execFileSync(process.execPath, ['--input-type=module', '-e', script], { cwd: pkgDir, encoding: 'utf8' }).trim());
}

describe('the ESM and the CommonJS build loaded side by side agree on a request', () => {
  it('app-wide idempotency() from one, per route from the other: one lease, the handler runs once (not a 409 to itself)', () => {
    const code = `
      app.use(esm.idempotency({ store, logger: false }));
      app.post('/orders', cjs.idempotency({ store, logger: false }), (_req, res) => void res.status(201).json({ runs: ++runs }));`;
    expect(run(code)).toEqual({ statuses: [201, 201], runs: 1 });
  });

  it('idempotencyErrorHandler() from the other build frees the key of a handler that threw: the retry runs', () => {
    const code = `
      app.use(esm.idempotency({ store, logger: false }));
      app.post('/orders', () => { runs++; throw Object.assign(new Error('bad'), { status: 400 }); });
      app.use(cjs.idempotencyErrorHandler());`;
    expect(run(code)).toEqual({ statuses: [400, 400], runs: 2 });
  });

  it("idempotencyErrorHandler() from the other build frees the key of a handler that threw after res.writeHead(): the retry runs, not a 409 for the lease", () => {
    const code = `
      app.use(esm.idempotency({ store, logger: false }));
      app.post('/orders', (_req, res) => { runs++; res.writeHead(201); throw new Error('after the head'); });
      app.use(cjs.idempotencyErrorHandler());`;
    expect(run(code)).toEqual({ statuses: ['cut', 'cut'], runs: 2 });
  });
});
