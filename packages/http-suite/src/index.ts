// The one entry point every binding's test/http.test.ts calls.
export { runHttpSuite, type HttpSuiteOptions } from './suite.js';
// What a binding's test app implements.
export type * from './contract.js';
// Store names, for narrowing a run while debugging.
export { STORE_NAMES, type StoreName } from './stores.js';
export type { Framework } from './context.js';
// The README quick start of a binding, loaded and checked the same way for Express and Koa.
export { expectReadmePayments, importReadmeQuickStart } from './readme.js';
// A store that answers begin() late, for a binding's timeout tests.
export { SlowBeginStore } from './slow-store.js';
