import { readFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { conformanceClauses } from '../src/index.js';

async function readme(): Promise<string> {
  return readFile(new URL('../README.md', import.meta.url), 'utf8');
}

describe('README', () => {
  // The example is not copied into a test: it IS the memory store's conformance run.
  it('example is test/memory-store.test.ts, verbatim', async () => {
    const block = /<!-- example -->\n```ts\n([\s\S]*?)```/.exec(await readme())?.[1];
    expect(block).toBeDefined();
    expect(block).toBe(await readFile(new URL('./memory-store.test.ts', import.meta.url), 'utf8'));
  });

  it('lists every clause, in run order', async () => {
    const section = /## Clauses\n([\s\S]*?)\n## /.exec(await readme())?.[1] ?? '';
    const listed = [...section.matchAll(/^- \*\*(.+?)\*\*/gm)].map((m) => m[1]);
    expect(listed).toEqual(conformanceClauses.map((c) => c.name));
  });
});
