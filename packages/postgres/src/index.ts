// The store and its factory: what users construct.
export { createPostgresStore, PostgresStore } from './postgres-store.js';
// Options shapes, so users can type their own config objects.
export type { PostgresConnectionOptions, PostgresPoolOptions, PostgresStoreOptions } from './options.js';
// Transactional mode: the typed client accessor for handlers, and the transaction class the engine drives.
export { pgTransaction, PgTransaction } from './transaction.js';
