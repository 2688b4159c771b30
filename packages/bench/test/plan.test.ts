import { describe, expect, it } from 'vitest';
import { makePlan, parseArgs } from '../src/plan.js';
import { httpTable, markdown } from '../src/table.js';

describe('plan', () => {
  it('--quick: Express and Fastify over memory and Redis, peers on memory only', () => {
    const plan = makePlan(parseArgs(['--quick']));
    expect(plan.frameworks).toEqual(['express', 'fastify']);
    expect(plan.targets('express')).toEqual([
      { library: 'idemkit', store: 'memory' },
      { library: 'idemkit', store: 'redis' },
      { library: 'express-idempotency', store: 'memory' },
      { library: 'node-idempotency', store: 'memory' },
    ]);
    expect(plan.targets('fastify').map((t) => t.library)).toEqual(['idemkit', 'idemkit', 'node-idempotency']);
  });

  it('full: three frameworks, four stores, peers on memory and Redis; Koa has no peer', () => {
    const plan = makePlan(parseArgs([]));
    expect(plan.frameworks).toEqual(['express', 'fastify', 'koa']);
    expect(plan.targets('koa').map((t) => t.store)).toEqual(['memory', 'redis', 'postgres', 'mongodb']);
    expect(plan.targets('fastify').filter((t) => t.library === 'node-idempotency').map((t) => t.store)).toEqual(['memory', 'redis']);
    expect(plan.stores).toEqual(['memory', 'postgres', 'redis', 'redis-cluster', 'mongodb']);
  });

  it('passes the flags pnpm forwards, and rejects unknown ones', () => {
    const plan = makePlan(parseArgs(['--', '--quick', '--duration=4', '--frameworks=koa', '--stores=memory', '--skip=stores,peers']));
    expect(plan).toMatchObject({ duration: 4, frameworks: ['koa'], stores: [] });
    expect(plan.targets('koa')).toEqual([{ library: 'idemkit', store: 'memory' }]);
    expect(() => parseArgs(['--fast'])).toThrow(/unknown argument --fast/);
    expect(() => parseArgs(['--frameworks=hapi'])).toThrow(/unknown "hapi"/);
  });

  it('--probes adds the two probes to Express and Fastify (not Koa), also without peers', () => {
    const plan = makePlan(parseArgs(['--quick', '--probes', '--skip=peers', '--stores=memory']));
    expect(plan.targets('fastify')).toEqual([
      { library: 'idemkit', store: 'memory' },
      { library: 'probe-hook', store: 'memory' },
      { library: 'probe-store', store: 'memory' },
    ]);
    expect(plan.targets('express').map((t) => t.library)).toEqual(['idemkit', 'probe-hook', 'probe-store']);
    expect(makePlan(parseArgs(['--probes'])).targets('koa').some((t) => t.library.startsWith('probe'))).toBe(false);
    expect(makePlan(parseArgs(['--quick'])).targets('fastify').some((t) => t.library.startsWith('probe'))).toBe(false);
  });

  it('crash check: Fastify, idemkit on every shared store and the peer on Redis; skippable', () => {
    expect(makePlan(parseArgs(['--quick'])).crash).toEqual({
      framework: 'fastify',
      targets: [
        { library: 'idemkit', store: 'redis' },
        { library: 'node-idempotency', store: 'redis' },
      ],
    });
    expect(makePlan(parseArgs([])).crash?.targets.map((t) => `${t.library}/${t.store}`)).toEqual(['idemkit/redis', 'idemkit/postgres', 'idemkit/mongodb', 'node-idempotency/redis']);
    // Its own section: --skip=http keeps it, --skip=crash drops it; Koa has no peer; memory has nothing to check.
    expect(makePlan(parseArgs(['--skip=http'])).crash?.framework).toBe('fastify');
    expect(makePlan(parseArgs(['--skip=crash'])).crash).toBeNull();
    expect(makePlan(parseArgs(['--frameworks=koa', '--stores=redis'])).crash).toEqual({ framework: 'koa', targets: [{ library: 'idemkit', store: 'redis' }] });
    expect(makePlan(parseArgs(['--skip=peers', '--stores=memory,redis'])).crash?.targets).toEqual([{ library: 'idemkit', store: 'redis' }]);
    expect(makePlan(parseArgs(['--stores=memory'])).crash).toBeNull();
  });

  it('runs the hello handler unless --handler=postgres asks for the database one', () => {
    expect(makePlan(parseArgs(['--quick'])).handler).toBe('hello');
    expect(makePlan(parseArgs(['--handler=postgres'])).handler).toBe('postgres');
    expect(() => parseArgs(['--handler=mysql'])).toThrow(/unknown "mysql"/);
  });
});

describe('tables', () => {
  it('pads columns and right-aligns numbers', () => {
    expect(markdown(['a', 'n'], [['xx', '1'], ['y', '100']], [1])).toBe(['| a  |   n |', '|----|----:|', '| xx |   1 |', '| y  | 100 |'].join('\n'));
  });

  it('flags a library that ran the handler more than once in the race check', () => {
    const base = { framework: 'express', store: 'memory', path: 'new-key', rps: 1000, p50: 1, p99: 5, ratio: 0.5, serverCpuPerRequest: 42.4, redisCpuPerRequest: null, roundTripsPerRequest: null, handlerRunsPerRequest: 1, requests: 100, handlerRuns: 100, non2xx: 0, errors: 0, runs: 1 } as const;
    const table = httpTable([
      { ...base, library: 'idemkit', race: { requests: 50, handlerRuns: 1, statuses: { '201': 3, '409': 47 } } },
      { ...base, library: 'express-idempotency', race: { requests: 50, handlerRuns: 7, statuses: { '201': 50 } } },
    ]);
    expect(table).toContain('once (3×201 47×409)');
    expect(table).toContain('**7×** (50×201)');
  });

  it('shows the server CPU per request, and the Redis CPU only for rows on Redis', () => {
    const base = { framework: 'fastify', library: 'idemkit', path: 'new-key', rps: 1000, p50: 1, p99: 5, ratio: 0.5, roundTripsPerRequest: 2, handlerRunsPerRequest: 1, requests: 100, handlerRuns: 100, non2xx: 0, errors: 0, runs: 1, race: null } as const;
    const [head, , memory, redis] = httpTable([
      { ...base, store: 'memory', serverCpuPerRequest: 24.6, redisCpuPerRequest: null },
      { ...base, store: 'redis', serverCpuPerRequest: 50.2, redisCpuPerRequest: 31.4 },
    ]).split('\n');
    const cells = (line = ''): string[] => line.split('|').map((c) => c.trim());
    const cpu = cells(head).indexOf('CPU µs/req');
    const store = cells(head).indexOf('Redis µs/req');
    expect([cells(memory)[cpu], cells(memory)[store]]).toEqual(['25', '–']);
    expect([cells(redis)[cpu], cells(redis)[store]]).toEqual(['50', '31']);
  });

  it('--local-cache runs idemkit with localCache, and only when asked', () => {
    expect(makePlan(parseArgs(['--quick'])).localCache).toBe(false);
    expect(makePlan(parseArgs(['--quick', '--local-cache'])).localCache).toBe(true);
  });
});
