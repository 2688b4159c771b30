import { describe, expect, it } from 'vitest';
import { ownerOf, summarize, type CpuProfile } from '../src/cpuprofile.js';

// root → handler → makeRoom, and root → (garbage collector), root → (idle).
const profile: CpuProfile = {
  nodes: [
    { id: 1, callFrame: { functionName: '(root)', url: '', lineNumber: -1, columnNumber: -1 }, children: [2, 4, 5] },
    { id: 2, callFrame: { functionName: 'begin', url: 'file:///w/packages/core/dist/index.js', lineNumber: 673, columnNumber: 2 }, children: [3] },
    { id: 3, callFrame: { functionName: '#makeRoom', url: 'file:///w/packages/core/dist/index.js', lineNumber: 741, columnNumber: 2 } },
    { id: 4, callFrame: { functionName: '(garbage collector)', url: '', lineNumber: -1, columnNumber: -1 } },
    { id: 5, callFrame: { functionName: '(idle)', url: '', lineNumber: -1, columnNumber: -1 } },
  ],
  startTime: 0,
  endTime: 10_000,
  samples: [3, 3, 2, 4, 5, 3],
  timeDeltas: [1000, 1000, 1000, 1000, 5000, 1000],
};

describe('summarize', () => {
  const summary = summarize(profile);

  it('sums sample intervals as self time and leaves idle out of busy time', () => {
    expect(summary.totalMs).toBe(10);
    expect(summary.busyMs).toBe(5);
    const makeRoom = summary.functions.find((f) => f.name === '#makeRoom');
    expect(makeRoom).toMatchObject({ selfMs: 3, selfPercent: 60, where: '@idemkit/core dist/index.js:742', owner: '@idemkit/core' });
  });

  it('gives callers their callees time as inclusive time, once per sample', () => {
    const begin = summary.functions.find((f) => f.name === 'begin');
    expect(begin).toMatchObject({ selfMs: 1, totalMs: 4, totalPercent: 80 });
  });

  it('orders functions by self time and groups time by package', () => {
    expect(summary.functions.map((f) => f.name)).toEqual(['#makeRoom', 'begin', '(garbage collector)']);
    expect(summary.owners).toEqual([
      { owner: '@idemkit/core', selfMs: 4, selfPercent: 80 },
      { owner: '(garbage collector)', selfMs: 1, selfPercent: 20 },
    ]);
  });
});

describe('ownerOf', () => {
  it('names node_modules packages (scoped or not), workspace packages and node internals', () => {
    expect(ownerOf('file:///r/node_modules/.pnpm/fastify@5.6.0/node_modules/fastify/lib/reply.js', 'send')).toEqual({ owner: 'fastify', file: 'lib/reply.js' });
    expect(ownerOf('file:///r/node_modules/@koa/router/dist/index.js', 'x')).toEqual({ owner: '@koa/router', file: 'dist/index.js' });
    expect(ownerOf('file:///r/packages/fastify/dist/index.js', 'x')).toEqual({ owner: '@idemkit/fastify', file: 'dist/index.js' });
    expect(ownerOf('node:events', 'emit')).toEqual({ owner: 'node:internals', file: 'events' });
    expect(ownerOf('', 'writev')).toEqual({ owner: '(native)', file: '' });
  });
});
