// The one entry point every binding's test/http.test.ts calls.
export { runHttpSuite, type HttpSuiteOptions } from './suite.js';
// What a binding's test app implements.
export type * from './contract.js';
// Store names, for narrowing a run while debugging.
export { STORE_NAMES, type StoreName } from './stores.js';
export type { Framework } from './context.js';
