export { runStoreConformance, conformanceClauses } from './run.js';
export type { StoreConformanceOptions } from './options.js';
export { nastyKeys } from './nasty-keys.js';
export { bytesEqual } from './context.js';
