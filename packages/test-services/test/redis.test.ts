import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { resolveRedis, uniquePrefix, type ResolvedService } from '../src/index.js';

describe('Redis through the resolver (real server)', () => {
  let svc: ResolvedService<string>;
  let redis: Redis;
  const prefix = uniquePrefix('redis smoke');

  beforeAll(async () => {
    svc = await resolveRedis();
    redis = new Redis(svc.value, { lazyConnect: true, maxRetriesPerRequest: 1 });
    await redis.connect();
  });
  afterAll(async () => {
    await redis?.del(`${prefix}k`);
    redis?.disconnect();
    await svc?.stop();
  });

  it('writes and reads a key under its own prefix', async () => {
    await redis.set(`${prefix}k`, 'v1', 'PX', 60_000);
    expect(await redis.get(`${prefix}k`)).toBe('v1');
    expect(await redis.pttl(`${prefix}k`)).toBeGreaterThan(0);
  });
});
