import { randomUUID } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import type { Server } from 'node:http';
import { resolvePostgres, type ResolvedService } from '@idemkit/test-services';
import type { Express } from 'express';
import pg from 'pg';
import { afterAll, beforeAll, expect, it } from 'vitest';

/*
 * The root README's "Use it" block, as written, against a real Postgres: it lives here because the
 * demo depends on every package it imports (as an npm user would, through their built entry
 * points). Its two free names, `tenantId` and `createOrder`, are defined after it (function
 * declarations, so the block sees them), and it runs in a database of its own: it uses the
 * default public.idempotency_keys table.
 */
let service: ResolvedService<string>;
let admin: pg.Pool;
const database = `idemkit_root_readme_${randomUUID().replaceAll('-', '').slice(0, 12)}`;
const dir = new URL('../.tmp/', import.meta.url);
const file = new URL(`root-readme-${randomUUID()}.ts`, dir);

beforeAll(async () => {
  service = await resolvePostgres();
  admin = new pg.Pool({ connectionString: service.value, max: 1 });
  await admin.query(`CREATE DATABASE "${database}"`);
});

afterAll(async () => {
  rmSync(file, { force: true });
  await admin.query(`DROP DATABASE IF EXISTS "${database}" WITH (FORCE)`);
  await admin.end();
  await service.stop();
});

it('the root README "Use it" block runs as written: scoped keys, replay, a throw frees its key', async () => {
  const readme = readFileSync(new URL('../../../README.md', import.meta.url), 'utf8');
  const block = /## Use it\n+```ts\n([\s\S]*?)```/.exec(readme)?.[1];
  expect(block).toBeDefined();
  const helpers = `
function tenantId(req: express.Request): string {
  return req.get('x-tenant') as string;
}
let orders = 0;
function createOrder(req: express.Request, res: express.Response): void {
  const { item } = req.body as { item?: unknown };
  if (typeof item !== 'string') throw Object.assign(new Error('item must be a string'), { status: 400 });
  orders += 1;
  res.status(201).json({ id: orders, item });
}
export { app, pool, orders };
`;
  mkdirSync(dir, { recursive: true });
  writeFileSync(file, block + helpers);
  const target = new URL(service.value);
  target.pathname = `/${database}`;
  const previousUrl = process.env.DATABASE_URL;
  process.env.DATABASE_URL = target.toString();
  let mod: { app: Express; pool: pg.Pool; orders: number };
  try {
    mod = (await import(/* @vite-ignore */ file.href)) as typeof mod;
  } finally {
    if (previousUrl === undefined) delete process.env.DATABASE_URL;
    else process.env.DATABASE_URL = previousUrl;
  }
  const server: Server = await new Promise((resolve) => {
    const s = mod.app.listen(0, '127.0.0.1', () => resolve(s));
  });
  const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const order = (tenant: string, key: string | undefined, body: unknown): Promise<Response> =>
    fetch(`${base}/orders`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-tenant': tenant, ...(key === undefined ? {} : { 'idempotency-key': key }) },
      body: JSON.stringify(body),
    });
  try {
    // POST now needs a key.
    const keyless = await order('acme', undefined, { item: 'book' });
    expect(keyless.status).toBe(400);
    expect(keyless.headers.get('content-type')).toBe('application/problem+json');

    const first = await order('acme', 'k-1', { item: 'book' });
    expect(first.status).toBe(201);
    const firstBody = await first.text();
    const retry = await order('acme', 'k-1', { item: 'book' });
    expect(retry.status).toBe(201);
    expect(retry.headers.get('idempotent-replayed')).toBe('true');
    expect(await retry.text()).toBe(firstBody);
    expect(mod.orders).toBe(1);

    // Another tenant with the same key gets its own execution (scope).
    const other = await order('globex', 'k-1', { item: 'pen' });
    expect(other.status).toBe(201);
    expect(other.headers.get('idempotent-replayed')).toBeNull();
    expect(mod.orders).toBe(2);

    // A handler that throws frees its key (idempotencyErrorHandler after the routes): the
    // corrected request runs under it instead of meeting a stored 400 (a 422 then).
    expect((await order('acme', 'k-2', { item: 42 })).status).toBe(400);
    const fixed = await order('acme', 'k-2', { item: 'lamp' });
    expect(fixed.status).toBe(201);
    expect(mod.orders).toBe(3);
  } finally {
    await new Promise<void>((resolve) => server.close(() => resolve()));
    await mod.pool.end();
  }
});
