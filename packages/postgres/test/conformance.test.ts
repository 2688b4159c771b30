import { runStoreConformance } from '@idemkit/store-conformance';
import pg from 'pg';
import { createPostgresStore } from '../src/index.js';
import { openSchema } from './helpers.js';

// Its own schema (dropped in cleanup), so this file runs in parallel with the others.
const db = await openSchema(20);
await createPostgresStore({ pool: db.pool, schema: db.schema }).migrate();
// A second, independent pool for the cross-client races.
const second = new pg.Pool({ connectionString: db.url, max: 20 });

runStoreConformance({
  name: 'postgres',
  createStore: () => createPostgresStore({ pool: db.pool, schema: db.schema }),
  createSecondStore: () => createPostgresStore({ pool: second, schema: db.schema }),
  cleanup: async () => {
    await second.end();
    await db.drop();
  },
});
