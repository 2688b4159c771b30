import { Redis } from 'ioredis';
import { afterAll, describe, expect, it } from 'vitest';
import { redisCpu, type RedisCpu } from '../src/redis-cpu.js';

// The Redis column of the table: Redis's own CPU clock, read through INFO cpu. Real Redis only.
const url = process.env['TEST_REDIS_URL'];
if (!url) throw new Error('TEST_REDIS_URL is not set: run `bash scripts/services.sh up` and source its env file');

describe('Redis CPU reading', () => {
  let cpu: RedisCpu | undefined;
  const client = new Redis(url);
  afterAll(async () => {
    await cpu?.close();
    await client.quit();
  });

  it('counts the CPU Redis spends on work sent to it, in µs', async () => {
    cpu = await redisCpu(url);
    const before = await cpu.micros();
    expect(Number.isInteger(before)).toBe(true);
    expect(before).toBeGreaterThan(0);
    // A script that keeps Redis busy for a while: its time must show up on Redis's clock.
    await client.eval('local n = 0 for i = 1, 3000000 do n = n + i end return n', 0);
    const after = await cpu.micros();
    expect(after - before).toBeGreaterThan(1_000);
  });
});
