import { randomUUID } from 'node:crypto';
import { afterAll, describe, expect, it } from 'vitest';
import { AnswerKeeper } from '../src/apps/probes.js';
import { ORDER_BODY } from '../src/config.js';
import { startServer, type RunningServer } from '../src/processes.js';

describe('probes (the floor under any library; `pnpm build` first)', () => {
  it('the store probe keeps at most its cap, dropping the oldest 1% at a time', () => {
    const keeper = new AnswerKeeper(200);
    for (let i = 0; i < 1000; i++) keeper.keep(`k${i}`, 201, { 'content-type': 'application/json' }, new Uint8Array(4));
    expect(keeper.size).toBeLessThanOrEqual(200);
    expect(keeper.size).toBeGreaterThanOrEqual(198);
    keeper.keep(undefined, 201, {}, new Uint8Array(0));
    expect(keeper.size).toBeLessThanOrEqual(200);
  });

  const servers: RunningServer[] = [];
  afterAll(async () => {
    await Promise.all(servers.map((s) => s.stop()));
  });

  it.each([
    ['express', 'probe-hook'],
    ['express', 'probe-store'],
    ['fastify', 'probe-hook'],
    ['fastify', 'probe-store'],
  ] as const)('%s with %s answers as bare does: 201 with the order, the handler run for every request', async (framework, library) => {
    const server = await startServer({ framework, library, store: 'memory', runId: 'test', env: {}, handler: 'hello', ordersTable: '' });
    servers.push(server);
    const key = randomUUID();
    const answers = [];
    for (let i = 0; i < 2; i++) {
      const res = await fetch(`${server.url}/orders`, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': key }, body: ORDER_BODY });
      answers.push({ status: res.status, body: (await res.json()) as { sku?: unknown } });
    }
    expect(answers.map((a) => [a.status, a.body.sku])).toEqual([
      [201, 'A1'],
      [201, 'A1'],
    ]);
    // Not idempotent: the same key runs the handler again. The store probe kept the answer.
    const stats = await server.settledStats();
    expect([stats.runs, stats.kept]).toEqual([2, library === 'probe-store' ? 1 : 0]);
  });
});
