// The factory and its store type: what users call.
export { createMongoStore } from './mongodb-store.js';
export type { MongoStore } from './mongodb-store.js';
// Options, for users who build them programmatically.
export { DEFAULTS } from './options.js';
export type { MongoStoreOptions, MongoStoreTarget } from './options.js';
// The stored document shape, for typing `createMongoStore({ collection })` and ad-hoc queries.
export type { IdempotencyDocument, StoredResponseDocument } from './document.js';
// Index names and outcome, for users who manage indexes themselves.
export { TTL_INDEX_NAME, PLAIN_INDEX_NAME } from './indexes.js';
export type { IndexOutcome } from './indexes.js';
