/**
 * Issue 10.5: hostile input through HTTP, against the demo on Fastify, Express and Koa, with the
 * memory store for malformed requests and with the real stores for hostile keys. Every request gets
 * a clear 4xx (problem+json where idemkit or the demo answers; Node's own 400 for bytes its HTTP
 * parser refuses), the server stays up, and the store holds no garbage.
 */
import { Redis } from 'ioredis';
import { MongoClient } from 'mongodb';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { post, postHead, rawRequest, type RawAnswer } from './support/http.js';
import { countRecords, dropNamespace, location, type StoreKind } from '../src/records.js';
import { namespace, serviceUrl } from '../src/services.js';
import { DEMO, ProcessPool, type ServerProcess } from '../src/spawn.js';

const FRAMEWORKS = ['fastify', 'express', 'koa'] as const;
const REAL: Array<[StoreKind, string]> = [['postgres', 'DATABASE_URL'], ['redis', 'REDIS_URL'], ['mongodb', 'MONGODB_URL']];
const ORDER = '{"item":"x","amount":1}';
const PROBLEM = /^application\/problem\+json/;

const pool = new ProcessPool();
afterAll(() => pool.stopAll());

const portOf = (p: ServerProcess) => Number(new URL(p.url).port);
const raw = (p: ServerProcess, lines: Array<Buffer | string>, body = ORDER) =>
  rawRequest(portOf(p), postHead('/orders', lines, Buffer.byteLength(body)), body);
const contentType = (a: RawAnswer) => /^content-type: *(.*)$/im.exec(a.head)?.[1] ?? '';
const nested = (depth: number) => '['.repeat(depth) + ']'.repeat(depth);

/** The server still answers a normal request after the hostile one. */
async function expectUp(p: ServerProcess, tag: string): Promise<void> {
  const r = await post(`${p.url}/orders`, ORDER, { 'idempotency-key': `up-${tag}-${Math.random().toString(36).slice(2)}` });
  expect(r.status, `server up after ${tag}`).toBe(201);
  expect(p.child.exitCode).toBeNull();
}

async function ordersOf(p: ServerProcess): Promise<Array<{ key: string | null }>> {
  return ((await (await fetch(`${p.url}/orders`)).json()) as { orders: Array<{ key: string | null }> }).orders;
}

describe.each(FRAMEWORKS)('hostile requests to the %s demo (memory store)', (framework) => {
  let demo: ServerProcess;
  beforeAll(async () => {
    demo = await pool.spawn(DEMO, { FRAMEWORK: framework, STORE: 'memory', DEMO_WORK_MS: '0' });
  });
  afterAll(() => demo.stop());

  // [name, header lines, expected status, problem+json?]
  const headerCases: Array<[string, Array<Buffer | string>, number, boolean]> = [
    ['empty key (0 chars)', ['Idempotency-Key: '], 400, true],
    ['256-char key', [`Idempotency-Key: ${'k'.repeat(256)}`], 400, true],
    ['10 000-char key', [`Idempotency-Key: ${'k'.repeat(10_000)}`], 400, true],
    ['a tab inside the key', ['Idempotency-Key: a\tb'], 400, true],
    ['invalid UTF-8 bytes in the key', [Buffer.concat([Buffer.from('Idempotency-Key: a'), Buffer.from([0xff, 0xfe, 0xc3]), Buffer.from('b')])], 400, true],
    ['two Idempotency-Key headers', ['Idempotency-Key: a1', 'Idempotency-Key: a2'], 400, true],
    ['the same key header twice', ['Idempotency-Key: a1', 'idempotency-key: a1'], 400, true],
    ['an unterminated sf-string', ['Idempotency-Key: "unterminated'], 400, true],
    ['an sf-string with a bad escape', ['Idempotency-Key: "a\\qb"'], 400, true],
    // Bytes Node's HTTP parser refuses before any framework code runs: Node's own 400.
    ['a control character (0x01) in the key', ['Idempotency-Key: a\x01b'], 400, false],
    ['DEL (0x7f) in the key', ['Idempotency-Key: a\x7fb'], 400, false],
    ['a NUL byte in the key', ['Idempotency-Key: a\x00b'], 400, false],
  ];

  it.each(headerCases)('%s → %i, nothing runs, server stays up', async (name, lines, status, problem) => {
    const before = (await ordersOf(demo)).length;
    const answer = await raw(demo, lines);
    expect(answer.status).toBe(status);
    if (problem) {
      expect(contentType(answer)).toMatch(PROBLEM);
      expect((JSON.parse(answer.body) as { type: string }).type).toMatch(/\/key-invalid$/);
    }
    expect((await ordersOf(demo)).length).toBe(before);
    await expectUp(demo, name);
  });

  // [name, body, expected status]
  const bodyCases: Array<[string, string, number]> = [
    ['malformed JSON', '{"item":', 400],
    ['JSON nested 100 000 levels (over the 100 KB limit)', nested(100_000), 413],
    ['a body over the framework limit', JSON.stringify({ item: 'x'.repeat(200_000), amount: 1 }), 413],
    ['a non-string body key field (Mongo operator)', '{"idempotencyKey":{"$gt":""},"item":"x","amount":1}', 400],
  ];

  it.each(bodyCases)('%s → %i problem+json, nothing runs, server stays up', async (name, body, status) => {
    const before = (await ordersOf(demo)).length;
    const lines = name.includes('body key field') ? [] : [`Idempotency-Key: body-${name.length}-${framework}`];
    const answer = await raw(demo, lines, body);
    expect(answer.status).toBe(status);
    expect(contentType(answer)).toMatch(PROBLEM);
    expect((await ordersOf(demo)).length).toBe(before);
    await expectUp(demo, name);
  });

  it('JSON nested 50 000 levels within the body limit: no order, a 4xx the retry gets replayed, server stays up', async () => {
    const before = (await ordersOf(demo)).length;
    const answer = await raw(demo, [`Idempotency-Key: deep-${framework}`], nested(50_000));
    expect(answer.status).toBeGreaterThanOrEqual(400);
    expect(answer.status).toBeLessThan(500);
    // The handler's 400 is a storable answer: the retry gets it back, byte for byte.
    const retry = await raw(demo, [`Idempotency-Key: deep-${framework}`], nested(50_000));
    expect(retry.status).toBe(answer.status);
    expect(retry.head).toMatch(/^idempotent-replayed: true$/im);
    expect(retry.body).toBe(answer.body);
    expect((await ordersOf(demo)).length).toBe(before);
    await expectUp(demo, 'deep JSON');
  });

  // Was a defect: the recursive fingerprint threw RangeError (a 500). Fixed in core's iterative
  // canonical JSON, so such a body is fingerprinted like any other and reaches the handler, which
  // refuses it as an invalid order (400 problem).
  it('JSON nested 50 000 levels within the body limit gets a 4xx problem, not a 500', async () => {
    const answer = await raw(demo, [`Idempotency-Key: deep4xx-${framework}`], nested(50_000));
    expect(answer.status).toBeGreaterThanOrEqual(400);
    expect(answer.status).toBeLessThan(500);
    expect(contentType(answer)).toMatch(PROBLEM);
  });

  it('sf-string edge cases: "a\\"b" and "k";x=1 name keys (the latter the same as bare k); ?1 is a bare key', async () => {
    const k = `sf-${framework}`;
    const quoted = await raw(demo, [`Idempotency-Key: "${k}-a\\"b"`]);
    expect(quoted.status).toBe(201);
    const withParams = await raw(demo, [`Idempotency-Key: "${k}";x=1`]);
    expect(withParams.status).toBe(201);
    const bare = await raw(demo, [`Idempotency-Key: ${k}`]);
    expect(bare.status).toBe(201);
    expect(bare.head).toMatch(/^idempotent-replayed: true$/im);
    expect(bare.body).toBe(withParams.body);
    // Not an sf-string, so the bare form applies: the two characters are the key (SPEC: bare form accepted).
    const boolean = await raw(demo, ['Idempotency-Key: ?1']);
    expect(boolean.status).toBe(201);
    const orders = await ordersOf(demo);
    expect(orders.filter((o) => o.key === '?1')).toHaveLength(1);
    expect(orders.filter((o) => o.key === `${k}-a"b`)).toHaveLength(1);
    expect(orders.filter((o) => o.key === k)).toHaveLength(1);
  });

  // Was a defect: RFC 9110 §5.3 lets a proxy merge two `Idempotency-Key` lines into `a1, a2`, which
  // the bare form accepted as one key. parseKeyHeader now refuses a bare key with a comma.
  it('two keys merged into one line by a proxy ("a1, a2") get the same 400 as two lines', async () => {
    const answer = await raw(demo, [`Idempotency-Key: merged-${framework}-1, merged-${framework}-2`]);
    expect(answer.status).toBe(400);
  });
});

describe.each(FRAMEWORKS)('hostile keys against the real stores through %s', (framework) => {
  const demos = new Map<StoreKind, { demo: ServerProcess; url: string; ns: string }>();
  beforeAll(async () => {
    await Promise.all(
      REAL.map(async ([kind, variable]) => {
        const url = await serviceUrl(kind);
        const ns = namespace(`h${framework[0]}${kind[0]}`); // the demo allows 31 chars
        const demo = await pool.spawn(DEMO, { FRAMEWORK: framework, STORE: kind, [variable]: url, DEMO_NAMESPACE: ns, DEMO_WORK_MS: '0' });
        demos.set(kind, { demo, url, ns });
      }),
    );
  });
  afterAll(async () => {
    for (const [kind, { demo, url, ns }] of demos) {
      await demo.stop();
      await dropNamespace(kind, url, [`${ns}_orders`, `${ns}_idempotency_keys`], `${ns}:`);
    }
  });

  const hostileKeys = [
    `'; DROP TABLE x;--`,
    `]]..redis.call('FLUSHALL')..[[`,
    `{"$gt":""}`,
    `{"$ne":null}`,
    `*`,
    `%`,
    `\\`,
    `-:a`,
    `k`.repeat(255),
  ];

  it.each(REAL.map(([k]) => k))('%s: payload keys are plain keys (one run, then replays), invalid ones leave no record', async (kind) => {
    const { demo, url, ns } = demos.get(kind)!;
    // A record another client made first: an operator-shaped key must never match it.
    const bystander = await post(`${demo.url}/orders`, ORDER, { 'idempotency-key': 'zzz-bystander' });
    expect(bystander.status).toBe(201);
    const sentinel = kind === 'redis' ? new Redis(url) : undefined;
    await sentinel?.set(`${ns}:sentinel`, 'still here');

    for (const key of hostileKeys) {
      const first = await post(`${demo.url}/orders`, ORDER, { 'idempotency-key': key });
      expect(first.status, key).toBe(201);
      expect(first.headers.get('idempotent-replayed'), key).toBeNull();
      const again = await post(`${demo.url}/orders`, ORDER, { 'idempotency-key': key });
      expect(again.status, key).toBe(201);
      expect(again.headers.get('idempotent-replayed'), key).toBe('true');
      expect(again.text, key).toBe(first.text);
    }
    for (const lines of [['Idempotency-Key: '], [`Idempotency-Key: ${'k'.repeat(256)}`], [`Idempotency-Key: ${'k'.repeat(10_000)}`], ['Idempotency-Key: a\xffb'], ['Idempotency-Key: x1', 'Idempotency-Key: x2']]) {
      expect((await raw(demo, lines)).status).toBe(400);
    }

    const orders = await ordersOf(demo);
    for (const key of hostileKeys) expect(orders.filter((o) => o.key === key), key).toHaveLength(1);
    const records = await countRecords(kind, url, location(kind, ns, 'demo'));
    expect(records.inProgress).toBe(0);
    expect(records.keys.sort()).toEqual([...hostileKeys, 'zzz-bystander'].map((k) => `-:${k}`).sort());
    if (sentinel) {
      expect(await sentinel.get(`${ns}:sentinel`)).toBe('still here');
      await sentinel.del(`${ns}:sentinel`);
      sentinel.disconnect();
    }
    if (kind === 'mongodb') {
      const client = await MongoClient.connect(url);
      expect(await client.db().collection(`${ns}_idempotency_keys`).countDocuments()).toBe(hostileKeys.length + 1);
      await client.close();
    }
    await expectUp(demo, kind);
  });
});
