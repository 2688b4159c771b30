import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isolatedPostgresSchema, resolvePostgres, type IsolatedSchema, type ResolvedService } from '../src/index.js';

describe('PostgreSQL through the resolver (real server)', () => {
  let svc: ResolvedService<string>;
  let iso: IsolatedSchema;

  beforeAll(async () => {
    svc = await resolvePostgres();
    iso = await isolatedPostgresSchema(svc.value, 'pg smoke');
  });
  afterAll(async () => {
    await iso?.drop();
    await svc?.stop();
  });

  it('writes and reads a row inside its own schema', async () => {
    const client = new pg.Client({ connectionString: iso.url });
    await client.connect();
    try {
      await client.query('CREATE TABLE items (k text PRIMARY KEY, v jsonb NOT NULL)');
      await client.query('INSERT INTO items VALUES ($1, $2)', ['a', { n: 1 }]);
      const { rows } = await client.query<{ v: { n: number } }>('SELECT v FROM items WHERE k = $1', ['a']);
      expect(rows).toEqual([{ v: { n: 1 } }]);
      const where = await client.query<{ table_schema: string }>(
        "SELECT table_schema FROM information_schema.tables WHERE table_name = 'items' AND table_schema = $1",
        [iso.schema],
      );
      expect(where.rows).toEqual([{ table_schema: iso.schema }]);
    } finally {
      await client.end();
    }
  });

  it('drop() removes the schema and its tables', async () => {
    const other = await isolatedPostgresSchema(svc.value, 'pg drop');
    await other.drop();
    const client = new pg.Client({ connectionString: svc.value });
    await client.connect();
    try {
      const { rowCount } = await client.query('SELECT 1 FROM information_schema.schemata WHERE schema_name = $1', [
        other.schema,
      ]);
      expect(rowCount).toBe(0);
    } finally {
      await client.end();
    }
  });
});
