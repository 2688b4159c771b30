import { runStoreConformance } from '@idemkit/store-conformance';
import { createMongoStore } from '../src/index.js';
import { openTestDatabase } from './mongo.js';

// Top-level await: the suite registers its tests synchronously, so the database exists first.
const t = await openTestDatabase('mongodb_conformance');

runStoreConformance({
  name: 'mongodb',
  // No TTL index here on purpose: MongoDB's TTL monitor (every 60 s) could delete expired records
  // under the purge clause's exact counts. The contract holds without it (reads filter on expiry).
  createStore: () => createMongoStore({ db: t.db }),
  // A second, independent MongoClient (own connection pool): cross-client races go through two.
  createSecondStore: async () => createMongoStore({ db: (await t.client()).db(t.dbName) }),
  cleanup: () => t.close(),
});
