import { randomUUID } from 'node:crypto';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { expect, it, vi } from 'vitest';

/** Runs the README's quick start as written; only its import of this package points at the source. */
it('README quick start: the retry is replayed and the payment charged once', async () => {
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
  const block = /## Quick start\n+```ts\n([\s\S]*?)```/.exec(readme)?.[1];
  expect(block).toBeDefined();
  const source = block!.replace("from '@idemkit/fastify';", "from '../src/index.js';");
  expect(source).not.toBe(block);

  // A module next to the tests, so 'fastify' and '@idemkit/core' resolve as they would for a user.
  const file = fileURLToPath(new URL(`./.readme-${randomUUID()}.ts`, import.meta.url));
  writeFileSync(file, `${source}\nexport {};\n`);
  const log = vi.spyOn(console, 'log').mockImplementation(() => undefined);
  try {
    await import(file);
    expect(log.mock.calls).toEqual([[1], [201, 'true'], [true]]);
  } finally {
    log.mockRestore();
    rmSync(file, { force: true });
  }
});
