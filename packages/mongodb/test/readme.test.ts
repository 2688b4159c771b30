import { randomUUID } from 'node:crypto';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { openTestDatabase } from './mongo.js';
import type { TestDatabase } from './mongo.js';

/**
 * Runs the README's quick start as written: the block is saved as a TypeScript module next to this
 * test and imported. Only two things are rewired: `@idemkit/mongodb` points at the source under
 * test, and the database name is this file's own, so runs sharing one server never replay each other.
 */
describe('README quick start', () => {
  let t: TestDatabase;
  const file = new URL(`./.readme-quick-start-${randomUUID()}.ts`, import.meta.url);

  beforeAll(async () => {
    t = await openTestDatabase('mongodb_readme');
  });
  afterAll(async () => {
    rmSync(file, { force: true });
    await t?.close();
  });

  it('charges once and logs the documented output', async () => {
    const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
    const block = /## Quick start[\s\S]*?```ts\n([\s\S]*?)```/.exec(readme)?.[1];
    expect(block).toBeDefined();
    expect(block).toContain("client.db('shop')");
    const source = block!
      .replace("from '@idemkit/mongodb'", "from '../src/index.js'")
      .replace("client.db('shop')", `client.db(${JSON.stringify(t.dbName)})`);
    writeFileSync(file, source);

    const log = vi.spyOn(console, 'log').mockImplementation(() => {});
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => {});
    const previousUrl = process.env.MONGODB_URL;
    process.env.MONGODB_URL = t.url;
    let calls: unknown[][];
    let warnings: unknown[][];
    try {
      await import(/* @vite-ignore */ file.href);
    } finally {
      calls = [...log.mock.calls];
      warnings = [...warn.mock.calls];
      if (previousUrl === undefined) delete process.env.MONGODB_URL;
      else process.env.MONGODB_URL = previousUrl;
      log.mockRestore();
      warn.mockRestore();
    }
    expect(calls).toEqual([[1], [{ chargeId: 'ch_order_1', cents: 4200 }], [true]]);
    // ensureIndexes: silent on MongoDB, exactly one warning on a server without TTL indexes.
    expect(warnings).toHaveLength((await t.isFerretDB()) ? 1 : 0);
    expect(await t.db.collection('idempotency_keys').countDocuments({})).toBe(1);
  });
});
