import type { IdempotencyStore } from '@idemkit/core';
import { expect } from 'vitest';
import {
  LONG_MS,
  SHORT_MS,
  acquire,
  clause,
  expectSameResponse,
  mustGet,
  textResponse,
  useStore,
  waitUntilGone,
  type SuiteContext,
} from './context.js';
import { nastyKeys } from './nasty-keys.js';

/** Claim every key at once (a collision shows as `existing`), complete each with its own name. */
async function claimAndComplete(store: IdempotencyStore, keys: readonly string[]): Promise<void> {
  const results = await Promise.all(keys.map((key) => store.begin(key, `fp:${key}`, LONG_MS)));
  results.forEach((result, i) => {
    expect(result.kind, `begin(${JSON.stringify(keys[i])})`).toBe('acquired');
  });
  await Promise.all(
    keys.map(async (key, i) => {
      const result = results[i];
      if (result?.kind !== 'acquired') return;
      expect(await store.complete(key, result.token, textResponse(key), LONG_MS)).toBe(true);
    }),
  );
}

async function expectOwnRecord(store: IdempotencyStore, key: string): Promise<void> {
  const record = await mustGet(store, key);
  expect(record.key).toBe(key);
  expect(record.fingerprint).toBe(`fp:${key}`);
  expect(record.state).toBe('completed');
  expectSameResponse(record.response, textResponse(key));
}

/** SPEC §3 keys: key material is data, every distinct string is its own record. */
export function keysSuite(ctx: SuiteContext): void {
  const store = useStore(ctx);

  clause('keys with SQL, Lua, Redis-pattern, Mongo-operator, control and non-ASCII characters round-trip and do not collide', async () => {
    const base = ctx.key('keys');
    // Each fragment both inside a prefixed key and at the very start of a key.
    const keys = nastyKeys.flatMap((nasty, i) => [`${base}:${nasty}`, `${nasty}|${base}:${i}`]);
    expect(new Set(keys).size).toBe(keys.length);
    await claimAndComplete(store(), keys);
    for (const key of keys) await expectOwnRecord(store(), key);
  });

  clause('a release on a key with pattern characters deletes only that key', async () => {
    const base = ctx.key('keys-pattern');
    const keys = [`${base}`, `${base}*`, `${base}?`, `${base}[ab]`, `${base}a`, `${base}b`, `${base}%`, `${base}_`];
    const tokens = await Promise.all(keys.map((key) => acquire(store(), key)));
    for (const [i, key] of keys.entries()) {
      if (!key.endsWith('*') && !key.endsWith('%')) continue;
      expect(await store().release(key, tokens[i]!)).toBe(true);
    }
    for (const key of keys) {
      const record = await store().get(key);
      if (key.endsWith('*') || key.endsWith('%')) expect(record).toBeUndefined();
      else expect(record?.state).toBe('in_progress');
    }
  });

  clause('keys that differ only by scope, case, or by being a prefix of another are independent', async () => {
    const id = ctx.key('keys-scope');
    const keys = [
      `tenant-a:${id}`,
      `tenant-b:${id}`,
      `TENANT-A:${id}`,
      `${id}`,
      `${id}:`,
      `${id}:x`,
      `${id}:x:y`,
      `${id}x`,
      `${id} `,
      `${id}\u0001`,
      `${id}`.toUpperCase(),
    ];
    expect(new Set(keys).size).toBe(keys.length);
    await claimAndComplete(store(), keys);
    for (const key of keys) await expectOwnRecord(store(), key);
  });

  clause('completing, releasing or expiring one key leaves a neighbouring key alone', async () => {
    const id = ctx.key('keys-neighbours');
    const a = `tenant-a:${id}`;
    const b = `tenant-b:${id}`;
    const ab = `tenant-a:${id}:more`;
    const tokenA = await acquire(store(), a, LONG_MS);
    await acquire(store(), b, SHORT_MS);
    const tokenAb = await acquire(store(), ab, LONG_MS);

    // a's token means nothing for b or ab.
    expect(await store().complete(b, tokenA, textResponse('a'), LONG_MS)).toBe(false);
    expect(await store().complete(ab, tokenA, textResponse('a'), LONG_MS)).toBe(false);
    expect(await store().complete(a, tokenA, textResponse('a'), LONG_MS)).toBe(true);
    expect((await mustGet(store(), ab)).state).toBe('in_progress');

    expect(await store().release(ab, tokenAb)).toBe(true);
    expect((await mustGet(store(), a)).state).toBe('completed');

    await waitUntilGone(store(), b);
    expectSameResponse((await mustGet(store(), a)).response, textResponse('a'));
  });

  clause('a 1 KiB key round-trips', async () => {
    const key = `${ctx.key('keys-long')}:${'k'.repeat(1024)}`;
    await claimAndComplete(store(), [key]);
    await expectOwnRecord(store(), key);
  });

  clause('two 1 KiB keys that differ only in their last character are two records (no key is cut short)', async () => {
    const stem = `${ctx.key('keys-long-twins')}:${'k'.repeat(1024)}`;
    const keys = [`${stem}a`, `${stem}b`];
    await claimAndComplete(store(), keys);
    for (const key of keys) await expectOwnRecord(store(), key);
  });
}
