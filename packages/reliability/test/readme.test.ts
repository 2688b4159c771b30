/** The README's commands and file table stay true: every file it names exists, every script it runs is defined. */
import { existsSync, readFileSync } from 'node:fs';
import { expect, it } from 'vitest';

const root = new URL('../', import.meta.url);
const readme = readFileSync(new URL('README.md', root), 'utf8');
const pkg = JSON.parse(readFileSync(new URL('package.json', root), 'utf8')) as { scripts: Record<string, string> };

it('names only files that exist', () => {
  const files = [...readme.matchAll(/`((?:test|src)\/[\w./-]+\.ts|soak\.mjs)`/g)].map((m) => m[1]!);
  expect(files.length).toBeGreaterThan(10);
  for (const f of files) expect(existsSync(new URL(f, root)), f).toBe(true);
});

it('runs only scripts the package defines', () => {
  const scripts = [...readme.matchAll(/pnpm --filter @idemkit\/reliability (\w+)/g)].map((m) => m[1]!);
  expect(scripts).toEqual(expect.arrayContaining(['test', 'soak']));
  for (const s of scripts) expect(pkg.scripts[s], s).toBeDefined();
});
