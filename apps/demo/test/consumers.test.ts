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
