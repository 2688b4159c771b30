import { createMemoryStore } from '@idemkit/core';
import { runStoreConformance, type StoreConformanceOptions } from '@idemkit/store-conformance';
import { describe, expect, it } from 'vitest';

const createStore = (): ReturnType<typeof createMemoryStore> => createMemoryStore();

// Before, a misspelt option was ignored: `createSecondstore` ran the suite without its two-client
// races, and nothing said so.
describe('runStoreConformance refuses options it would silently ignore or misread', () => {
  it.each([
    ['a misspelt option', { name: 'x', createStore, createSecondstore: createStore }, /unknown option\(s\) `createSecondstore`/],
    ['no name', { createStore }, /`name` must be a non-empty string/],
    ['a store instead of a factory', { name: 'x', createStore: createMemoryStore() }, /`createStore` must be a function/],
    ['a flag given as text', { name: 'x', createStore, nativeExpiry: 'false' }, /`nativeExpiry` must be true or false/],
    ['cleanup that is no function', { name: 'x', createStore, cleanup: true }, /`cleanup` must be a function/],
  ])('%s', (_what, options, message) => {
    expect(() => runStoreConformance(options as unknown as StoreConformanceOptions)).toThrow(message);
  });
});
