import { Agent, request } from 'node:http';
import { afterAll, describe, expect, it } from 'vitest';
import { FRAMEWORKS } from '../src/config.js';
import { spawnDemo, type DemoProcess } from './processes.js';

const running: DemoProcess[] = [];
afterAll(async () => {
  await Promise.all(running.splice(0).map((p) => p.stop()));
});

/** A POST over a keep-alive connection that stays open afterwards, as a browser's does. */
function postKeepAlive(agent: Agent, url: string, key: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(`${url}/orders`, { method: 'POST', agent, headers: { 'content-type': 'application/json', 'idempotency-key': key } }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (c: string) => (body += c)).on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end(JSON.stringify({ item: 'beans', amount: 2400 }));
  });
}

/** Resolves with the exit code, or with 'alive' if the process is still up after `ms`. */
function exitWithin(demo: DemoProcess, ms: number): Promise<number | string | 'alive'> {
  const { child } = demo;
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.exitCode ?? child.signalCode ?? 'alive');
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve('alive'), ms);
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      resolve(code ?? signal ?? 'alive');
    });
  });
}

// A deploy (SIGTERM) or Ctrl+C (SIGINT) while a payment runs. Before: Express and Koa dropped the
// connection at once (ECONNRESET: the customer never saw the order the server went on to make,
// and on a shared store the key stayed locked with 409s for the lease); Fastify delivered the
// answer but then waited for the browser's idle keep-alive socket (Fastify keeps those 72 s).
describe.each(FRAMEWORKS)('the demo on %s shuts down gracefully', (framework) => {
  it.each(['SIGTERM', 'SIGINT'] as const)('%s during a payment: the payment gets its 201, then the process exits at once', async (signal) => {
    const demo = await spawnDemo({ FRAMEWORK: framework, DEMO_WORK_MS: '2000' });
    running.push(demo);
    const agent = new Agent({ keepAlive: true });
    try {
      const key = crypto.randomUUID();
      const payment = postKeepAlive(agent, demo.url, key);
      // The payment is running once a second request with its key is refused as in progress.
      await expect
        .poll(async () => (await fetch(`${demo.url}/orders`, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': key }, body: JSON.stringify({ item: 'beans', amount: 2400 }) })).status, { timeout: 10_000, interval: 20 })
        .toBe(409);
      demo.child.kill(signal);

      const answer = await payment;
      expect(answer.status).toBe(201);
      expect(JSON.parse(answer.body)).toMatchObject({ item: 'beans', amount: 2400, key });
      // The agent still holds the socket open: the demo must not wait for it.
      expect(await exitWithin(demo, 3_000)).toBe(0);
    } finally {
      agent.destroy();
      await demo.stop();
    }
  }, 30_000);
});
