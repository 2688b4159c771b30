import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, expect, it, vi } from 'vitest';
import * as client from '../src/index.js';
import { startServer, type TestServer } from './server.js';

let server: TestServer;
beforeAll(async () => {
  server = await startServer();
});
afterAll(() => server.close());

it('README quick start runs as written against a real server', async () => {
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
  const code = /## Quick start\n+```ts\n([\s\S]*?)```/.exec(readme)?.[1];
  expect(code).toBeDefined();
  const body = code!
    .replace("import { createIdempotentFetch } from '@idemkit/client';", 'const { createIdempotentFetch } = client;')
    .replace('http://127.0.0.1:3000', server.url);
  const log = vi.fn();
  await (new Function('client', 'console', `return (async () => {\n${body}\n})();`) as (c: typeof client, l: { log: typeof log }) => Promise<void>)(client, { log });
  expect(log.mock.calls).toEqual([['attempt 1: 201'], [201, 'first run']]);
  expect(server.runs.get('orders')).toBe(1);
});
