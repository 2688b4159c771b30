import { randomUUID } from 'node:crypto';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { deleteByPrefix, redisService } from './services.js';
import type { ResolvedService } from '@idemkit/test-services';

/**
 * Runs the README's quick start as written: the block is saved as a TypeScript module next to this
 * test and imported. Only two things are rewired: `@idemkit/redis` points at the source under
 * test, and the prefix is made unique so runs sharing one server never replay each other.
 */
describe('README quick start', () => {
  let service: ResolvedService<string>;
  const file = new URL(`./.readme-quick-start-${randomUUID()}.ts`, import.meta.url);
  const prefix = `idemkit-test:readme:${randomUUID()}:`;

  beforeAll(async () => {
    service = await redisService();
  });
  afterAll(async () => {
    rmSync(file, { force: true });
    const redis = new Redis(service.value);
    await deleteByPrefix(redis, prefix);
    await redis.quit();
    await service.stop();
  });

  it('charges once and logs the documented output', async () => {
    const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
    const block = /## Quick start[\s\S]*?```ts\n([\s\S]*?)```/.exec(readme)?.[1];
    expect(block).toBeDefined();
    expect(block).toContain("prefix: 'shop:idem:'");
    const source = block!
      .replace("from '@idemkit/redis'", "from '../src/index.js'")
      .replace("prefix: 'shop:idem:'", `prefix: ${JSON.stringify(prefix)}`);
    writeFileSync(file, source);

    const log = vi.spyOn(console, 'log').mockImplementation(() => {});
    const previousUrl = process.env.REDIS_URL;
    process.env.REDIS_URL = service.value;
    let calls: unknown[][];
    try {
      await import(/* @vite-ignore */ file.href);
    } finally {
      calls = [...log.mock.calls];
      if (previousUrl === undefined) delete process.env.REDIS_URL;
      else process.env.REDIS_URL = previousUrl;
      log.mockRestore();
    }
    expect(calls).toEqual([[1], [{ chargeId: 'ch_order_1', cents: 4200 }], [true]]);
  });
});
