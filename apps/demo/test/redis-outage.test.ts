import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { connect, createServer, type AddressInfo, type Socket } from 'node:net';
import { resolveRedis } from '@idemkit/test-services';
import { Redis } from 'ioredis';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { spawnDemo, type DemoProcess } from './processes.js';

const cleanups: Array<() => Promise<void>> = [];
afterAll(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/** A loopback hop to Redis that the test can take down (nothing listens) and bring back on the same port. */
async function redisHop(target: URL): Promise<{ url: string; down: () => Promise<void>; up: () => Promise<void>; close: () => Promise<void> }> {
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    const upstream = connect(Number(target.port || 6379), target.hostname);
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on('error', () => undefined).on('close', () => {
        sockets.delete(socket);
        client.destroy();
        upstream.destroy();
      });
    }
    client.pipe(upstream).pipe(client);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  const url = new URL(target.href);
  url.hostname = '127.0.0.1';
  url.port = String(port);
  const down = async (): Promise<void> => {
    if (!server.listening) return;
    const closed = once(server, 'close');
    server.close();
    for (const socket of sockets) socket.destroy();
    await closed;
  };
  return {
    url: url.href,
    down,
    up: async () => {
      server.listen(port, '127.0.0.1');
      await once(server, 'listening');
    },
    close: down,
  };
}

describe('the demo on Redis, when Redis goes away after start', () => {
  it('says so in one line, and once more when it is back (not a stack per reconnect), and serves orders again', async () => {
    const service = await resolveRedis();
    const hop = await redisHop(new URL(service.value));
    cleanups.push(hop.close);
    const namespace = `outage_${randomUUID().slice(0, 8)}`;
    const demo: DemoProcess = await spawnDemo({ STORE: 'redis', REDIS_URL: hop.url, DEMO_NAMESPACE: namespace, FRAMEWORK: 'express' });
    cleanups.push(async () => {
      await demo.stop();
      const redis = new Redis(service.value);
      try {
        const keys = await redis.keys(`${namespace}:*`);
        if (keys.length > 0) await redis.del(...keys);
      } finally {
        redis.disconnect();
      }
    });
    let log = '';
    demo.child.stderr?.on('data', (chunk: Buffer) => (log += chunk.toString()));
    const order = (): Promise<Response> =>
      fetch(`${demo.url}/orders`, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': randomUUID() }, body: '{"item":"tea","amount":300}' });

    expect((await order()).status).toBe(201);
    await hop.down();
    // Every order during the outage is refused (503), while ioredis reconnects again and again.
    await vi.waitFor(async () => expect((await order()).status).toBe(503), { timeout: 15_000, interval: 100 });
    for (let i = 0; i < 5; i++) expect((await order()).status).toBe(503);
    await hop.up();
    await vi.waitFor(() => expect(log).toContain('Redis is back'), { timeout: 15_000, interval: 100 });
    expect(log.match(/Redis is unreachable/g)).toHaveLength(1);
    // Before, ioredis printed this and a stack on every reconnect attempt.
    expect(log).not.toContain('Unhandled error event');
    await vi.waitFor(async () => expect((await order()).status).toBe(201), { timeout: 15_000, interval: 100 });
  });
});
