import { readFileSync } from 'node:fs';
import { describe, expect, it, vi } from 'vitest';
import * as core from '../src/index.js';

/** Runs the README's quick start as written (imports rewired to the source under test). */
describe('README quick start', () => {
  it('charges once and logs the documented output', async () => {
    const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
    const block = /## Quick start[^\n]*\n+```ts\n([\s\S]*?)```/.exec(readme)?.[1];
    expect(block).toBeDefined();
    const body = block!
      .replace(/^import \{([^}]*)\} from '@idemkit\/core';$/m, 'const {$1} = core;')
      .replace(/: \{ id: string; amount: number \}/g, '');
    const log = vi.fn();
    const run = new Function('core', 'console', `return (async () => {\n${body}\n})();`) as (c: typeof core, c2: { log: typeof log }) => Promise<void>;
    await run(core, { log });
    expect(log.mock.calls).toEqual([[1], [{ chargeId: 'ch_evt_1', amount: 4200 }]]);
  });
});
