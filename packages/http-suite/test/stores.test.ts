import { describe, expect, it } from 'vitest';
import { openStore, STORE_NAMES } from '../src/stores.js';

// The suite's own wiring: each store opens against its real server, round-trips a record, and
// its "broken" twin really fails (otherwise the fail-closed cases would prove nothing).
describe.each(STORE_NAMES)('%s harness', (name) => {
  it('opens, round-trips a record, and its broken twin rejects every call', async () => {
    const harness = await openStore(name);
    try {
      const key = `harness-${name}-${Date.now()}`;
      const begun = await harness.store.begin(key, 'fp', 5_000);
      expect(begun.kind).toBe('acquired');
      expect((await harness.store.get(key))?.state).toBe('in_progress');
      const broken = await harness.broken();
      await expect(broken.begin(key, 'fp', 5_000)).rejects.toThrow();
      await expect(broken.get(key)).rejects.toThrow();
      if (name === 'postgres') expect(harness.pg?.schema).toMatch(/^t_/);
    } finally {
      await harness.close();
    }
  });
});
