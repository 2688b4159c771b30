import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const PACKAGES = ['core', 'client', 'express', 'koa', 'fastify', 'postgres', 'redis', 'mongodb'].map((p) => `@idemkit/${p}`);
const cwd = fileURLToPath(new URL('..', import.meta.url));

function exportedNames(code: string, type: 'commonjs' | 'module'): string[] {
  const run = spawnSync(process.execPath, ['--input-type', type, '-e', code], { cwd, encoding: 'utf8', timeout: 30_000 });
  expect(run.stderr).toBe('');
  expect(run.status).toBe(0);
  return JSON.parse(run.stdout) as string[];
}

/** What an npm user gets: the built packages load through `require` and `import` with the same API. */
describe.each(PACKAGES)('%s as a consumer loads it', (name) => {
  it('require() and import() expose the same names', () => {
    const cjs = exportedNames(`console.log(JSON.stringify(Object.keys(require(${JSON.stringify(name)})).sort()))`, 'commonjs');
    const esm = exportedNames(`const m = await import(${JSON.stringify(name)}); console.log(JSON.stringify(Object.keys(m).filter((k) => k !== 'module.exports').sort()))`, 'module');
    expect(cjs.length).toBeGreaterThan(0);
    expect(esm).toEqual(cjs);
  });
});

/**
 * One app can load both builds of core (a CJS dependency requires it, ESM code imports it): an
 * error thrown by one copy's engine is still `instanceof` the other copy's classes.
 */
describe('@idemkit/core error classes across its ESM and CJS builds', () => {
  it('instanceof holds both ways, by class, and not for a sibling class', () => {
    const code = `
      import { createRequire } from 'node:module';
      const esm = await import('@idemkit/core');
      const cjs = createRequire(process.cwd() + '/')('@idemkit/core');
      if (esm.KeyError === cjs.KeyError) throw new Error('one copy only: the test proves nothing');
      const engine = cjs.createIdempotencyEngine({ store: cjs.createMemoryStore() });
      const decision = await engine.decide({ method: 'POST', path: '/', headers: {}, body: undefined });
      const fromCjs = decision.error;
      const fromEsm = new esm.StoreUnavailableError('ERR_IDEMKIT_STORE_UNAVAILABLE', 503, 'down');
      const full = new cjs.MemoryStoreFullError('full');
      console.log(JSON.stringify([
        fromCjs instanceof esm.KeyError, fromCjs instanceof esm.IdempotencyError, fromCjs instanceof Error,
        fromEsm instanceof cjs.StoreUnavailableError, fromEsm instanceof cjs.IdempotencyError,
        full instanceof esm.MemoryStoreFullError,
        fromCjs instanceof esm.FingerprintMismatchError, fromEsm instanceof cjs.KeyError,
        fromCjs instanceof esm.ConfigurationError, ({ code: fromCjs.code }) instanceof esm.KeyError,
      ]));`;
    const run = spawnSync(process.execPath, ['--input-type', 'module', '-e', code], { cwd, encoding: 'utf8', timeout: 30_000 });
    expect(run.stderr).toBe('');
    // Before: [false, false, true, false, false, false, false, false, false, false].
    expect(JSON.parse(run.stdout)).toEqual([true, true, true, true, true, true, false, false, false, false]);
  });

  it('an app subclass matches only its own instances', () => {
    const code = `
      import { createRequire } from 'node:module';
      const esm = await import('@idemkit/core');
      const cjs = createRequire(process.cwd() + '/')('@idemkit/core');
      class PaymentKeyError extends esm.KeyError {}
      const mine = new PaymentKeyError('ERR_IDEMKIT_KEY_INVALID', 400, 'bad');
      const theirs = new cjs.KeyError('ERR_IDEMKIT_KEY_INVALID', 400, 'bad');
      console.log(JSON.stringify([mine instanceof PaymentKeyError, mine instanceof cjs.KeyError, theirs instanceof PaymentKeyError]));`;
    const run = spawnSync(process.execPath, ['--input-type', 'module', '-e', code], { cwd, encoding: 'utf8', timeout: 30_000 });
    expect(run.stderr).toBe('');
    expect(JSON.parse(run.stdout)).toEqual([true, true, false]);
  });
});

/** Apps on the strictest settings fill options from configuration, `undefined` included. */
describe('the packages under exactOptionalPropertyTypes', () => {
  it('take `undefined` for every optional option, as they do at runtime (test/strict/options.ts)', () => {
    const tsc = fileURLToPath(new URL('../../../node_modules/typescript/bin/tsc', import.meta.url));
    const run = spawnSync(process.execPath, [tsc, '-p', 'test/strict'], { cwd, encoding: 'utf8', timeout: 120_000 });
    // Before, every option rejected it: "Type 'undefined' is not assignable to type 'string'".
    expect(run.stdout + run.stderr).toBe('');
    expect(run.status).toBe(0);
  }, 120_000);
});
