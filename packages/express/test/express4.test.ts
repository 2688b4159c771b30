import { runHttpSuite } from '@idemkit/http-suite';
import express4 from 'express4';
import { describe, expect, it } from 'vitest';
import { buildApp, listen } from './app.js';

// The lowest peer major: the whole behaviour table on the memory store (the stores are proven with Express 5).
describe('express 4', () => {
  it('is really Express 4', async () => {
    const { createRequire } = await import('node:module');
    const version = (createRequire(import.meta.url)('express4/package.json') as { version: string }).version;
    expect(version).toMatch(/^4\./);
  });
  runHttpSuite({ framework: 'express', startApp: (input) => listen(buildApp(input, express4)), stores: ['memory'] });
});
