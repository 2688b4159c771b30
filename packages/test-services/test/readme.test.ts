import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it, vi } from 'vitest';

// Runs the README's example as written (imports pointed at the source), against the real server.
describe('README example', () => {
  it('runs and prints what its comment says', async () => {
    const readme = readFileSync(fileURLToPath(new URL('../README.md', import.meta.url)), 'utf8');
    const code = /```ts\n([\s\S]*?)```/.exec(readme)?.[1];
    expect(code).toBeDefined();
    const body = code!
      .replace("import { isolatedPostgresSchema, resolvePostgres, uniquePrefix } from '@idemkit/test-services';", '')
      .replace("import pg from 'pg';", '');
    const lib = await import('../src/index.js');
    const pg = (await import('pg')).default;
    const log = vi.spyOn(console, 'log').mockImplementation(() => {});
    try {
      const AsyncFunction = Object.getPrototypeOf(async () => {}).constructor as new (
        ...args: string[]
      ) => (...a: unknown[]) => Promise<void>;
      await new AsyncFunction('isolatedPostgresSchema', 'resolvePostgres', 'uniquePrefix', 'pg', body)(
        lib.isolatedPostgresSchema,
        lib.resolvePostgres,
        lib.uniquePrefix,
        pg,
      );
      expect(log).toHaveBeenCalledWith('hello', true);
    } finally {
      log.mockRestore();
    }
  });
});
