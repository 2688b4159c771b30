// The factory and its store type: what users call.
export { createMongoStore } from './mongodb-store.js';
export type { MongoStore } from './mongodb-store.js';
// Options, for users who build them programmatically.
export { DEFAULTS } from './options.js';
export type { MongoStoreOptions, MongoStoreTarget } from './options.js';
// Which fencing a store uses ('native' on MongoDB, 'claims' on FerretDB v1).
export type { Fencing } from './fencing.js';
export { CLAIM_WINDOW_MS } from './fencing.js';
// The stored document shape, for typing `createMongoStore({ collection })` and ad-hoc queries.
export type { ClaimDocument, IdempotencyDocument, StoredResponseDocument } from './document.js';
// Index names and outcome, for users who manage indexes themselves.
export { TTL_INDEX_NAME, PLAIN_INDEX_NAME } from './indexes.js';
export type { IndexOutcome } from './indexes.js';
