/**
 * A gap in core's property tests (fc.jsonValue stays shallow): fingerprinting deeply nested bodies.
 * Any body a framework accepts (≤ its limit) must get a decision from the engine, never an exception.
 */
import { createIdempotencyEngine, createMemoryStore } from '@idemkit/core';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

const engine = createIdempotencyEngine({ store: createMemoryStore(), logger: false });

/** A JSON value nested `depth` levels, alternating arrays and objects as `shape` says, as JSON.parse builds it. */
function deep(depth: number, shape: readonly boolean[]): unknown {
  let value: unknown = 1;
  for (let i = 0; i < depth; i++) value = shape[i % shape.length] ? [value] : { a: value };
  return value;
}

const decide = (body: unknown, key: string) =>
  engine.decide({ method: 'POST', path: '/orders', headers: { 'idempotency-key': key }, body });

describe('engine.decide on deeply nested bodies', () => {
  it('bodies up to 1 000 levels get a decision', async () => {
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1, max: 1_000 }), fc.array(fc.boolean(), { minLength: 1, maxLength: 4 }), async (depth, shape) => {
        const d = await decide(deep(depth, shape), `d-${depth}-${shape.join('')}-${Math.random()}`);
        expect(['run', 'replay']).toContain(d.kind);
        if (d.kind === 'run') await d.lease.abandon('handler-threw');
      }),
      { numRuns: 50 },
    );
  });

  // Was a defect (core's canonical JSON recursed per level and threw RangeError below 50 000
  // levels); fixed with an iterative canonicaliser in packages/core/src/canonical-json.ts.
  it('bodies of 10 000 to 60 000 levels (≤ 120 KB) get a decision, not an exception', async () => {
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 10_000, max: 60_000 }), fc.array(fc.boolean(), { minLength: 1, maxLength: 4 }), async (depth, shape) => {
        const d = await decide(deep(depth, shape), `deep-${depth}-${Math.random()}`);
        if (d.kind === 'run') await d.lease.abandon('handler-threw');
        // A fresh key: the body is fingerprinted and the handler may run.
        expect(d.kind).toBe('run');
      }),
      { numRuns: 10 },
    );
  });
});
