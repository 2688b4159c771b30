import { describe, expect, it } from 'vitest';
import { openStore, STORE_NAMES } from '../src/stores.js';

// The suite's own wiring: each store opens against its real server, round-trips a record, and
// its "broken" twin really fails (otherwise the fail-closed cases would prove nothing).
describe.each(STORE_NAMES)('%s harness', (name) => {
  it('opens, round-trips a record, and its broken twin rejects begin, get, complete, renew and release', async () => {
    const harness = await openStore(name);
    try {
      const key = `harness-${name}-${Date.now()}`;
      const begun = await harness.store.begin(key, 'fp', 5_000);
      expect(begun.kind).toBe('acquired');
      expect((await harness.store.get(key))?.state).toBe('in_progress');
      const broken = await harness.broken();
      await expect(broken.begin(key, 'fp', 5_000)).rejects.toThrow();
      await expect(broken.get(key)).rejects.toThrow();
      if (begun.kind !== 'acquired') throw new Error('expected acquired');
      const response = { status: 201, headers: [], body: new Uint8Array([1]) };
      await expect(broken.complete(key, begun.token, response, 5_000)).rejects.toThrow();
      await expect(broken.renew(key, begun.token, 5_000)).rejects.toThrow();
      await expect(broken.release(key, begun.token)).rejects.toThrow();
      if (name === 'postgres') expect(harness.pg?.schema).toMatch(/^t_/);
    } finally {
      await harness.close();
    }
  });
});
