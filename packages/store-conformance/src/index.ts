export { runStoreConformance, conformanceClauses, type ConformanceClause } from './run.js';
export type { StoreConformanceOptions } from './options.js';
// Helpers that need no describe: reusable in a store's own tests.
export { nastyKeys } from './nasty-keys.js';
export { bytesEqual } from './context.js';
