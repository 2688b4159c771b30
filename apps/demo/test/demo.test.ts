import { spawnSync } from 'node:child_process';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FRAMEWORKS, readConfig } from '../src/config.js';
import { startDemo, type RunningDemo } from '../src/server.js';

const post = (url: string, body: string, key?: string) =>
  fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', ...(key ? { 'idempotency-key': key } : {}) }, body });

describe.each(FRAMEWORKS)('demo on %s with the in-memory store', (framework) => {
  let demo: RunningDemo;
  beforeAll(async () => {
    demo = await startDemo(readConfig({ FRAMEWORK: framework, PORT: '0', DEMO_WORK_MS: '20' }));
  });
  afterAll(() => demo.close());

  it('POST /orders creates one order, a retry replays it with Location', async () => {
    const key = crypto.randomUUID();
    const first = await post(`${demo.url}/orders`, JSON.stringify({ item: 'book', amount: 1200 }), key);
    expect(first.status).toBe(201);
    const order = (await first.json()) as { id: string; item: string; amount: number; key: string };
    expect(order).toMatchObject({ item: 'book', amount: 1200, key });
    expect(first.headers.get('location')).toBe(`/orders/${order.id}`);

    const retry = await post(`${demo.url}/orders`, JSON.stringify({ amount: 1200, item: 'book' }), key);
    expect(retry.status).toBe(201);
    expect(retry.headers.get('idempotent-replayed')).toBe('true');
    expect(retry.headers.get('location')).toBe(`/orders/${order.id}`);
    expect(await retry.json()).toEqual(order);

    const { orders } = (await (await fetch(`${demo.url}/orders`)).json()) as { orders: Array<{ key: string }> };
    expect(orders.filter((o) => o.key === key)).toHaveLength(1);
  });

  // Was a 404 from the framework: the Location of every 201 named a route that did not exist.
  it('the Location of a 201 names the order; an unknown id is a 404 problem', async () => {
    const res = await post(`${demo.url}/orders`, JSON.stringify({ item: 'mug', amount: 900 }), crypto.randomUUID());
    expect(res.status).toBe(201);
    const order: unknown = await res.json();
    const located = await fetch(new URL(res.headers.get('location')!, demo.url));
    expect(located.status).toBe(200);
    expect(await located.json()).toEqual(order);
    const missing = await fetch(`${demo.url}/orders/ord_nope`);
    expect(missing.status).toBe(404);
    expect(missing.headers.get('content-type')).toContain('application/problem+json');
    expect(await missing.json()).toMatchObject({ type: 'https://idemkit.dev/demo/problems/order-not-found', status: 404 });
  });

  it('30 parallel requests with one key create exactly one order', async () => {
    const key = crypto.randomUUID();
    const responses = await Promise.all(Array.from({ length: 30 }, () => post(`${demo.url}/orders`, '{"item":"cup","amount":300}', key)));
    const statuses = responses.map((r) => r.status);
    expect(statuses.filter((s) => s === 201).length).toBeGreaterThanOrEqual(1);
    expect(statuses.every((s) => s === 201 || s === 409)).toBe(true);
    const { orders } = (await (await fetch(`${demo.url}/orders`)).json()) as { orders: Array<{ key: string }> };
    expect(orders.filter((o) => o.key === key)).toHaveLength(1);
  });

  it('invalid JSON gets 400 problem+json and creates nothing', async () => {
    const count = async (): Promise<number> => ((await (await fetch(`${demo.url}/orders`)).json()) as { orders: unknown[] }).orders.length;
    const before = await count();
    const res = await post(`${demo.url}/orders`, '{"item": ', crypto.randomUUID());
    expect(res.status).toBe(400);
    expect(res.headers.get('content-type')).toContain('application/problem+json');
    expect(await res.json()).toMatchObject({ type: 'https://idemkit.dev/demo/problems/invalid-json', status: 400 });
    expect(await count()).toBe(before);
  });

  // Was a 201 on Express (JSON.parse keeps `__proto__` as a plain key), 400 on Fastify and Koa;
  // `constructor.prototype`: 400 on Fastify only. Now Fastify's answer on every framework.
  it.each([
    ['a `__proto__` key', '{"__proto__": {"admin": true}, "item": "book", "amount": 1}', '/orders'],
    ['an escaped `__proto__` key, nested', '{"item": "book", "amount": 1, "meta": [{"\\u005f_proto__": {}}]}', '/orders'],
    ['`constructor.prototype`', '{"item": "book", "amount": 1, "constructor": {"prototype": {"admin": true}}}', '/orders'],
    ['a `__proto__` key in /create data', '{"idempotencyKey": "k-proto-create", "data": {"__proto__": {}}}', '/create'],
  ])('%s gets 400 invalid-json on every framework, twice, and creates nothing', async (_case, body, path) => {
    const count = async (): Promise<number> => ((await (await fetch(`${demo.url}/orders`)).json()) as { orders: unknown[] }).orders.length;
    const before = await count();
    const key = crypto.randomUUID();
    // Twice with one key: refused before idemkit on every framework, so never a stored replay.
    for (let attempt = 0; attempt < 2; attempt++) {
      const res = await post(`${demo.url}${path}`, body, key);
      expect(res.status).toBe(400);
      expect(res.headers.get('idempotent-replayed')).toBeNull();
      expect(await res.json()).toMatchObject({ type: 'https://idemkit.dev/demo/problems/invalid-json', status: 400 });
    }
    expect(await count()).toBe(before);
    // A key merely named like one, as a value, is an order like any other.
    expect((await post(`${demo.url}/orders`, '{"item": "__proto__", "amount": 1, "constructor": 5}', crypto.randomUUID())).status).toBe(201);
  });

  // Was a 500 on Express (its error handler ignored the 415's status) and text/plain on Koa.
  it('a body the app does not parse (text/plain) gets a 4xx problem+json, twice, and creates nothing', async () => {
    const count = async (): Promise<number> => ((await (await fetch(`${demo.url}/orders`)).json()) as { orders: unknown[] }).orders.length;
    const before = await count();
    const key = crypto.randomUUID();
    for (let attempt = 0; attempt < 2; attempt++) {
      const res = await fetch(`${demo.url}/orders`, { method: 'POST', headers: { 'content-type': 'text/plain', 'idempotency-key': key }, body: 'hi' });
      // Express and Koa parse JSON only, so idemkit refuses the unread body (415); Fastify reads
      // text/plain as a string, which the handler refuses as an order (400).
      expect(res.status).toBe(framework === 'fastify' ? 400 : 415);
      expect(res.headers.get('content-type')).toContain('application/problem+json');
      expect(((await res.json()) as { status: number }).status).toBe(res.status);
    }
    expect(await count()).toBe(before);
  });

  // Was Fastify's own 415 as plain JSON on Fastify, which has no XML parser.
  it('a body no parser of the framework reads (application/xml) gets 415 problem+json on every framework', async () => {
    const res = await fetch(`${demo.url}/orders`, { method: 'POST', headers: { 'content-type': 'application/xml', 'idempotency-key': crypto.randomUUID() }, body: '<order/>' });
    expect(res.status).toBe(415);
    expect(res.headers.get('content-type')).toContain('application/problem+json');
    expect(await res.json()).toMatchObject({ type: 'https://idemkit.dev/demo/problems/unsupported-media-type', status: 415 });
  });

  it('an invalid order gets 400 problem+json, a missing key gets the idemkit 400', async () => {
    const bad = await post(`${demo.url}/orders`, '{"item":"x","amount":-1}', crypto.randomUUID());
    expect(bad.status).toBe(400);
    expect(await bad.json()).toMatchObject({ type: 'https://idemkit.dev/demo/problems/invalid-order' });
    const keyless = await post(`${demo.url}/orders`, '{"item":"x","amount":1}');
    expect(keyless.status).toBe(400);
    expect(await keyless.json()).toMatchObject({ type: 'https://idemkit.dev/problems/key-missing' });
  });

  it('POST /create keeps the original sample working: body key, 201 { id, data }, replay', async () => {
    const body = JSON.stringify({ idempotencyKey: crypto.randomUUID(), data: { name: 'sample' } });
    const first = await post(`${demo.url}/create`, body);
    expect(first.status).toBe(201);
    const created = (await first.json()) as { id: string; data: unknown };
    expect(created.data).toEqual({ name: 'sample' });
    const again = await post(`${demo.url}/create`, body);
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect(await again.json()).toEqual(created);
  });

  it('serves the page and the browser build of the client', async () => {
    const page = await fetch(`${demo.url}/`);
    expect(page.headers.get('content-type')).toContain('text/html');
    expect(await page.text()).toContain('/vendor/idemkit-client.js');
    const client = await fetch(`${demo.url}/vendor/idemkit-client.js`);
    expect(client.headers.get('content-type')).toContain('javascript');
    expect(await client.text()).toContain('createIdempotentFetch');
  });
});

describe('configuration', () => {
  it('refuses unknown values with a clear message', () => {
    expect(() => readConfig({ STORE: 'sqlite' })).toThrow('STORE=sqlite is not supported. Use one of: memory, postgres, redis, mongodb.');
    expect(() => readConfig({ FRAMEWORK: 'hapi' })).toThrow('FRAMEWORK=hapi is not supported. Use one of: fastify, express, koa.');
    expect(() => readConfig({ STORE: 'redis' })).toThrow(/REDIS_URL/);
    expect(() => readConfig({ PORT: 'eighty' })).toThrow(/PORT/);
    // Was let through, and Fastify's listen() crashed the built app with a RangeError stack trace.
    expect(() => readConfig({ PORT: '70000' })).toThrow('PORT=70000 must be an integer >= 0 and <= 65535.');
    expect(readConfig({ PORT: '65535' }).port).toBe(65_535);
    // Was let through: setTimeout clamps a delay over 2^31 - 1 ms, so the "payment" took 1 ms.
    expect(() => readConfig({ DEMO_WORK_MS: '2147483648' })).toThrow('DEMO_WORK_MS=2147483648 must be an integer >= 0 and <= 2147483647.');
    expect(readConfig({ DEMO_WORK_MS: '2147483647' }).workMs).toBe(2_147_483_647);
  });

  it('defaults: port 3000, Fastify, memory store, 50 ms of work', () => {
    expect(readConfig({})).toMatchObject({ port: 3000, host: '127.0.0.1', framework: 'fastify', store: 'memory', workMs: 50 });
    // Was '': the demo listened on every interface and printed http://:3000.
    expect(readConfig({ HOST: '' }).host).toBe('127.0.0.1');
  });

  // Was http://::1:<port>, which no client parses.
  it.each(FRAMEWORKS)('on an IPv6 HOST (%s) the printed URL has the address in brackets and works', async (framework) => {
    const demo = await startDemo(readConfig({ FRAMEWORK: framework, HOST: '::1', PORT: '0' }));
    try {
      expect(demo.url).toMatch(/^http:\/\/\[::1\]:\d+$/);
      expect((await fetch(`${demo.url}/orders`)).status).toBe(200);
    } finally {
      await demo.close();
    }
  });

  it('the built app exits with the message when started with a bad value', () => {
    const main = fileURLToPath(new URL('../dist/main.js', import.meta.url));
    const run = spawnSync(process.execPath, [main], { env: { ...process.env, FRAMEWORK: 'rails' }, encoding: 'utf8', timeout: 20_000 });
    expect(run.status).toBe(2);
    expect(run.stderr).toContain('FRAMEWORK=rails is not supported');
  });

  // Was a driver's stack trace (Postgres, MongoDB) or, on Redis, a demo that said it was up and
  // then printed "[ioredis] Unhandled error event" on every reconnect while answering 503s.
  it.each([
    ['postgres', 'DATABASE_URL', 'postgres://postgres@127.0.0.1:PORT/test'],
    ['redis', 'REDIS_URL', 'redis://127.0.0.1:PORT'],
    ['mongodb', 'MONGODB_URL', 'mongodb://127.0.0.1:PORT/demo'],
  ])('the built app (STORE=%s) exits with one line naming %s when the server refuses', async (store, variable, url) => {
    // A port that was free a moment ago: connections to it are refused.
    const probe = createServer();
    await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
    const { port } = probe.address() as AddressInfo;
    await new Promise((resolve) => probe.close(resolve));
    const main = fileURLToPath(new URL('../dist/main.js', import.meta.url));
    const env = { ...process.env, PORT: '0', STORE: store, [variable]: url.replace('PORT', String(port)) };
    const run = spawnSync(process.execPath, [main], { env, encoding: 'utf8', timeout: 20_000 });
    expect(run.stdout).not.toContain('idemkit demo (');
    expect(run.status).toBe(2);
    expect(run.stderr.trim()).toBe(`[idemkit demo] STORE=${store} could not start with ${variable}: connect ECONNREFUSED 127.0.0.1:${port}. Is the server running, and is ${variable} right?`);
  });

  // Was a stack trace (listen EADDRNOTAVAIL, getaddrinfo ENOTFOUND) and exit code 1.
  it.each([
    ['fastify', '192.0.2.254', /EADDRNOTAVAIL/],
    ['express', '192.0.2.254', /EADDRNOTAVAIL/],
    ['fastify', 'no-such-host.invalid', /ENOTFOUND|EAI_AGAIN/],
    ['koa', 'no-such-host.invalid', /ENOTFOUND|EAI_AGAIN/],
  ])('the built app (%s) names HOST when it cannot listen on %s', (framework, host, code) => {
    const main = fileURLToPath(new URL('../dist/main.js', import.meta.url));
    const run = spawnSync(process.execPath, [main], { env: { ...process.env, PORT: '0', HOST: host, FRAMEWORK: framework }, encoding: 'utf8', timeout: 20_000 });
    expect(run.status).toBe(2);
    expect(run.stderr.trim().split('\n')).toHaveLength(1);
    expect(run.stderr).toContain(`[idemkit demo] Cannot listen on HOST=${host} PORT=0:`);
    expect(run.stderr).toMatch(code);
  });

  it.each(['fastify', 'express'])('the built app (%s) says so when its port is taken, and how to pick another', async (framework) => {
    const busy = createServer();
    await new Promise<void>((resolve) => busy.listen(0, '127.0.0.1', resolve));
    const { port } = busy.address() as AddressInfo;
    try {
      const main = fileURLToPath(new URL('../dist/main.js', import.meta.url));
      const run = spawnSync(process.execPath, [main], { env: { ...process.env, PORT: String(port), FRAMEWORK: framework }, encoding: 'utf8', timeout: 20_000 });
      expect(run.status).toBe(2);
      expect(run.stderr).toContain(`Port ${port} is in use`);
      expect(run.stderr).toContain('PORT=0');
    } finally {
      busy.close();
    }
  });
});
