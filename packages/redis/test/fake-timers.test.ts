import { afterAll, expect, it, vi } from 'vitest';
import { deleteByPrefix, redisClient, redisService, uniquePrefix } from './services.js';

// Time is faked before the store's module loads, as a vitest setup file or Jest's
// `fakeTimers.enableGlobally` does: the store must not pick up the fake setImmediate.
vi.useFakeTimers();
const { createRedisStore } = await import('../src/index.js');

const service = await redisService();
const client = await redisClient(service.value);
const prefix = uniquePrefix('redis_fake_timers');

afterAll(async () => {
  vi.useRealTimers();
  await deleteByPrefix(client, prefix);
  await client.quit();
  await service.stop();
});

it('fake timers installed before the store loads never leave its socket corked', async () => {
  const s = createRedisStore({ client, prefix });
  const r = await s.begin('k', 'fp', 60_000);
  expect(r.kind).toBe('acquired');
  if (r.kind === 'acquired') {
    expect(await s.complete('k', r.token, { status: 201, headers: [], body: new Uint8Array([1]) }, 60_000)).toBe(true);
  }
  expect(client.stream.writableCorked).toBe(0);
  expect(await client.ping()).toBe('PONG');
});
