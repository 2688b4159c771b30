import { afterAll, describe, expect, it } from 'vitest';
import { startServer, type RunningServer } from '../src/processes.js';
import { raceCheck } from '../src/race.js';

// The race check against real server processes (dist/server.js; `pnpm build` first). No timing
// assertions: only how often the handler ran.
describe('race check (50 parallel requests, one key, 50 ms handler)', () => {
  const servers: RunningServer[] = [];
  const start = async (library: 'bare' | 'idemkit', framework: 'express' | 'fastify' | 'koa') => {
    const server = await startServer({ framework, library, store: 'memory', runId: 'test', env: {}, handler: 'hello', ordersTable: '' });
    servers.push(server);
    return server;
  };
  afterAll(async () => {
    await Promise.all(servers.map((s) => s.stop()));
  });

  it('a bare server runs the handler for every request (the check sees duplicates)', async () => {
    const result = await raceCheck(await start('bare', 'express'));
    expect(result.handlerRuns).toBe(50);
    expect(result.statuses).toEqual({ '201': 50 });
  });

  it.each(['express', 'fastify', 'koa'] as const)('idemkit on %s runs it once; the others get 409 or the replay', async (framework) => {
    const result = await raceCheck(await start('idemkit', framework));
    expect(result.handlerRuns).toBe(1);
    // Which duplicates overlap the first (409) and which come after it (replayed 201) is timing.
    expect((result.statuses['201'] ?? 0) + (result.statuses['409'] ?? 0)).toBe(50);
  });
});
