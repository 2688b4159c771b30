import { expect } from 'vitest';
import { LONG_MS, clause, completed, expectSameResponse, mustGet, textResponse, useStore, type SuiteContext } from './context.js';

/** SPEC §3 close(): idempotent, and never closes a client other stores share. */
export function closeSuite(ctx: SuiteContext): void {
  const store = useStore(ctx);

  clause('close() is safe twice and leaves other stores (sharing the client) working', async () => {
    // A record kept through the suite's store before the close: closing another store on the
    // same backend must not take records with it (a close that deleted or dropped them would).
    const kept = ctx.key('close-kept');
    const keptResponse = await completed(store(), kept, textResponse('kept across a close'));
    const own = await ctx.options.createStore();
    const key = ctx.key('close-own');
    await completed(own, key);
    await own.close();
    await expect(own.close()).resolves.toBeUndefined();

    // The suite's store, and a store created after the close, still reach the backend.
    const other = ctx.key('close-other');
    await completed(store(), other, textResponse('still here'));
    expect((await mustGet(store(), other)).state).toBe('completed');
    expectSameResponse((await mustGet(store(), kept)).response, keptResponse);
    const later = await ctx.options.createStore();
    try {
      const result = await later.begin(ctx.key('close-later'), 'fp', LONG_MS);
      expect(result.kind).toBe('acquired');
    } finally {
      await later.close();
    }
  });

  if (ctx.options.createSecondStore) {
    const createSecond = ctx.options.createSecondStore;
    clause('closing a second-client store twice leaves the first working', async () => {
      const kept = ctx.key('close-second-kept');
      const keptResponse = await completed(store(), kept, textResponse('kept across a close'));
      const own = await createSecond();
      await own.get(ctx.key('close-second'));
      await own.close();
      await own.close();
      await completed(store(), ctx.key('close-second-other'));
      expectSameResponse((await mustGet(store(), kept)).response, keptResponse);
    });
  }
}
