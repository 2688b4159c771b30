import { readFile } from 'node:fs/promises';
import { type AddressInfo, connect, createServer } from 'node:net';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { constants } from 'node:buffer';
import { ConfigurationError, createIdempotencyEngine, type IncomingRequest, type LeaseToken } from '@idemkit/core';
import { answerHoldingProxy } from '@idemkit/test-services';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { createPostgresStore, type PostgresStore } from '../src/index.js';
import { buildQueries } from '../src/queries.js';
import { parseBytea } from '../src/pg-types.js';
import { schemaFileText } from '../src/schema.js';
import { bytes, openSchema, opensReadOnlyWhile, TEST_PREFIX, type TestSchema } from './helpers.js';

let db: TestSchema;
let store: PostgresStore;

beforeAll(async () => {
  db = await openSchema();
  store = createPostgresStore({ pool: db.pool, schema: db.schema });
  await store.migrate();
});

afterAll(async () => {
  await store.close();
  await db.drop();
});

const key = (): string => `k:${randomUUID()}`;

/** A TCP hop in front of the test database that can lose answers, and its URL (`through`). */
async function proxied(url: string) {
  const target = new URL(url);
  const proxy = await answerHoldingProxy(target.hostname, Number(target.port || 5432));
  const through = new URL(url);
  through.hostname = '127.0.0.1';
  through.port = String(proxy.port);
  return { proxy, through };
}
const response = { status: 201, headers: [['content-type', 'application/json']] as const, body: bytes('{"ok":true}') };

/** A pool whose clients count the statements they send (through the real driver, not a mock). */
function countingPool(url: string, max = 10): { pool: pg.Pool; count: () => number; reset: () => void } {
  let n = 0;
  const pool = new pg.Pool({ connectionString: url, max });
  pool.on('error', () => undefined);
  pool.on('connect', (client) => {
    const query = client.query.bind(client) as (...args: unknown[]) => unknown;
    (client as unknown as { query: (...args: unknown[]) => unknown }).query = (...args: unknown[]) => {
      n++;
      return query(...args);
    };
  });
  return { pool, count: () => n, reset: () => void (n = 0) };
}

/** A pool that logs in as `role`, created here with LOGIN and no other rights (trust auth). */
async function poolAsNewRole(role: string): Promise<pg.Pool> {
  await db.pool.query(`CREATE ROLE "${role}" LOGIN`);
  const url = new URL(db.url);
  url.username = role;
  url.password = '';
  return new pg.Pool({ connectionString: url.href, max: 2 });
}

describe('construction and options', () => {
  it('runs no SQL in the constructor', async () => {
    const counted = countingPool(db.url);
    const s = createPostgresStore({ pool: counted.pool, schema: `${db.schema}_never_created` });
    // Work deferred to a later tick (a migrate() kicked off by the constructor) would show by now.
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(counted.count()).toBe(0);
    expect(counted.pool.totalCount).toBe(0);
    await s.close();
    await counted.pool.end();
  });

  it('names the missing or conflicting option', () => {
    expect(() => createPostgresStore({} as never)).toThrow(/Missing required option `pool`/);
    expect(() => createPostgresStore({ pool: db.pool, connectionString: db.url } as never)).toThrow(/either `pool` or `connectionString`/);
    expect(() => createPostgresStore({ pool: db.pool, table: '' })).toThrow(/`table` must be a non-empty string/);
    expect(() => createPostgresStore({ pool: db.pool, schema: 'x'.repeat(64) })).toThrow(/`schema` must be at most 63 bytes/);
  });

  it('refuses a pg.Client as `pool`, and poolOptions next to a pool', async () => {
    // Before, an unconnected Client made every request wait out storeTimeoutMs, then answer 503.
    const client = new pg.Client({ connectionString: db.url });
    expect(() => createPostgresStore({ pool: client as unknown as pg.Pool })).toThrow(/`pool` must be a pg.Pool, not a pg.Client/);
    expect(() => createPostgresStore({ pool: db.pool, poolOptions: { max: 5 } } as never)).toThrow(/`poolOptions` applies only with `connectionString`/);
  });

  // Was: taken, and every first request got 422 with its key left claimed for the whole lease
  // (pg asks for binary columns, so the claim's flags and texts came back as Buffers).
  it("refuses a pool with pg's `binary: true`, given or through poolOptions", async () => {
    // pg takes `binary` (its defaults.js); @types/pg does not list it, JS users pass it all the same.
    const binaryOption = { binary: true } as object;
    const binary = new pg.Pool({ connectionString: db.url, ...binaryOption });
    try {
      expect(() => createPostgresStore({ pool: binary, schema: db.schema })).toThrow(/must not have pg's `binary: true`/);
      expect(() => createPostgresStore({ connectionString: db.url, poolOptions: { ...binaryOption } })).toThrow(/must not have pg's `binary: true`/);
    } finally {
      await binary.end();
    }
  });

  it('warns about options it does not know (a misspelt table name would silently use the default)', () => {
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => undefined);
    try {
      createPostgresStore({ pool: db.pool, tableName: 'orders_keys' } as never);
      expect(warn).toHaveBeenCalledWith('[idemkit] [postgres] Unknown option(s) ignored: tableName.');
    } finally {
      warn.mockRestore();
    }
  });

  it('escapes table and schema names (quotes, spaces, unicode)', async () => {
    const s = createPostgresStore({ pool: db.pool, schema: `${db.schema} "ü"`, table: 'odd"; DROP TABLE x; --' });
    await s.migrate();
    const k = key();
    const first = await s.begin(k, 'fp', 10_000);
    expect(first.kind).toBe('acquired');
    if (first.kind !== 'acquired') return;
    expect(await s.complete(k, first.token, response, 60_000)).toBe(true);
    expect((await s.get(k))?.response?.status).toBe(201);
    await db.pool.query(`DROP SCHEMA ${s.table.split('.')[0]} CASCADE`);
  });

  it('schema and table names with dots and capitals are one quoted name each, not a path or a folded name', async () => {
    const schema = `${db.schema}.Billing`;
    const s = createPostgresStore({ pool: db.pool, schema, table: 'Keys.V2' });
    try {
      await Promise.all([s.migrate(), s.migrate(), s.migrate()]);
      const { rows } = await db.pool.query<{ relname: string }>('SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 ORDER BY 1', [schema]);
      expect(rows.map((r) => r.relname)).toEqual(['Keys.V2', 'Keys.V2_expires_at_idx', 'Keys.V2_pkey']);
      const k = key();
      const first = await s.begin(k, 'fp', 10_000);
      if (first.kind !== 'acquired') throw new Error('expected acquired');
      expect(await s.complete(k, first.token, response, 60_000)).toBe(true);
      expect(await s.purgeExpired()).toBe(0);
      expect((await s.begin(k, 'fp', 10_000)).kind).toBe('existing');
    } finally {
      await db.pool.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    }
  });

  it('never ends a pool it was given; ends the one it created, once', async () => {
    const mine = new pg.Pool({ connectionString: db.url, max: 2 });
    const given = createPostgresStore({ pool: mine, schema: db.schema });
    await given.get(key());
    await given.close();
    await given.close();
    expect((await mine.query<{ one: number }>('SELECT 1 AS one')).rows[0]?.one).toBe(1);
    await mine.end();

    const owned = createPostgresStore({ connectionString: db.url, poolOptions: { max: 2 }, schema: db.schema });
    expect(await owned.get(key())).toBeUndefined();
    await Promise.all([owned.close(), owned.close()]);
    expect(owned.pool.ended).toBe(true);
    await expect(owned.get(key())).rejects.toThrow(/after calling end/);
  });

  it('close() of a pool it created waits for statements in flight (a graceful shutdown does not cut a completion)', async () => {
    const owned = createPostgresStore({ connectionString: db.url, poolOptions: { max: 2 }, schema: db.schema });
    let settled = false;
    const inFlight = owned.pool.query('SELECT pg_sleep(0.4)').then(() => (settled = true));
    await vi.waitFor(() => expect(owned.pool.idleCount).toBeLessThan(owned.pool.totalCount)); // checked out, running
    await owned.close();
    expect(settled).toBe(true);
    expect(owned.pool.totalCount).toBe(0);
    await inFlight;
  });
});

describe('the largest body it can read back', () => {
  it('declares it, so the engine refuses a larger maxBodyBytes at setup and larger answers get the 410 too-large marker', async () => {
    // bytea reaches pg as text, up to 4 characters a byte (bytea_output = 'escape'), and one
    // string holds at most MAX_STRING_LENGTH characters: a body past that is written, then every
    // read of its key fails in the driver.
    expect(store.maxResponseBytes).toBe(127 * 1024 * 1024);
    expect(4 * store.maxResponseBytes + 2).toBeLessThanOrEqual(constants.MAX_STRING_LENGTH);
    // Before: accepted, and a 300 MiB answer was stored that no retry could ever replay.
    expect(() => createIdempotencyEngine({ store, maxBodyBytes: 300 * 1024 * 1024, logger: false })).toThrow(ConfigurationError);
    expect(() => createIdempotencyEngine({ store, maxBodyBytes: 300 * 1024 * 1024, logger: false })).toThrow(/more than this store can keep in one record \(133169152 bytes\)/);
    expect(createIdempotencyEngine({ store, maxBodyBytes: store.maxResponseBytes, logger: false }).options.maxBodyBytes).toBe(store.maxResponseBytes);
    // Below the limit, maxBodyBytes decides (lowered here): a larger answer is not stored, and its
    // retry gets the too-large problem instead of a second run.
    const engine = createIdempotencyEngine({ store, maxBodyBytes: 1024, logger: false });
    const request = (k: string): IncomingRequest => ({ method: 'POST', path: '/exports', headers: { 'idempotency-key': k }, body: { a: 1 } });
    const k = key();
    const first = await engine.decide(request(k));
    if (first.kind !== 'run') throw new Error(`expected run, got ${first.kind}`);
    await first.lease.commit({ status: 200, headers: [['content-type', 'application/octet-stream']], body: new Uint8Array(2048) });
    const retry = await engine.decide(request(k));
    expect(retry.kind).toBe('replay');
    if (retry.kind !== 'replay') return;
    expect(retry.response.status).toBe(410);
    expect(retry.response.headers).toEqual(expect.arrayContaining([['content-type', 'application/problem+json']]));
    expect(new TextDecoder().decode(retry.response.body)).toMatch(/larger than maxBodyBytes \(1024 bytes\)/);
  });
});

describe('migrate() and sql/schema.sql', () => {
  it('is idempotent and safe when many app servers start at once', async () => {
    const schema = `${db.schema}_boot`;
    const pools = Array.from({ length: 8 }, () => new pg.Pool({ connectionString: db.url, max: 1 }));
    try {
      // Each "app server" has its own pool; all migrate at the same moment, twice.
      await Promise.all(pools.map((pool) => createPostgresStore({ pool, schema }).migrate()));
      await Promise.all(pools.map((pool) => createPostgresStore({ pool, schema }).migrate()));
      const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM pg_tables WHERE schemaname = $1', [schema]);
      expect(rows[0]).toEqual({ n: 1 });
    } finally {
      await db.pool.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
      await Promise.all(pools.map((p) => p.end()));
    }
  });

  it('refuses, naming the columns, when a table of that name is not the store\'s (an app\'s own idempotency_keys)', async () => {
    // A common name in payment code. Before: migrate() resolved (CREATE TABLE IF NOT EXISTS kept
    // the app's table and the expiry index went onto it), and every request failed at the store
    // ("column fingerprint does not exist"): 503s, or no idempotency at all with onStoreError: 'pass'.
    const schema = `${db.schema}_theirs`;
    try {
      await db.pool.query(`CREATE SCHEMA "${schema}"`);
      await db.pool.query(`CREATE TABLE "${schema}"."idempotency_keys" (id bigserial PRIMARY KEY, key text, response_status text, expires_at timestamptz)`);
      const s = createPostgresStore({ pool: db.pool, schema });
      const refused = /"idempotency_keys" is not an idemkit table: no column fingerprint, state, lease_token, lease_expires_at, response_headers, response_body, created_at; no unique index on key alone/;
      await expect(s.migrate()).rejects.toThrow(refused);
      // Nothing was added to it (rolled back), and a second boot says the same.
      const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM pg_indexes WHERE schemaname = $1', [schema]);
      expect(rows[0]).toEqual({ n: 1 });
      await expect(s.migrate()).rejects.toThrow(refused);
    } finally {
      await db.pool.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    }
  });

  it('refuses a table whose unique index on key is deferrable or invalid, or sits beside a deferrable one (begin\'s ON CONFLICT cannot use it)', async () => {
    // Before: migrate() resolved, and every begin failed ("ON CONFLICT does not support deferrable
    // unique constraints" / "there is no unique or exclusion constraint matching the ON CONFLICT
    // specification"): 503s, or no idempotency at all with onStoreError: 'pass'.
    const columns = `fingerprint text, state text NOT NULL, lease_token text, lease_expires_at timestamptz, response_status integer,
      response_headers jsonb, response_body bytea, created_at timestamptz NOT NULL DEFAULT now(), expires_at timestamptz NOT NULL`;
    const deferrable = `${db.schema}_deferrable`;
    const invalid = `${db.schema}_invalid`;
    // A plain unique index added beside a DEFERRABLE primary key (the obvious answer to the
    // refusal) does not help: ON CONFLICT (key) takes both as arbiters and refuses the deferrable one.
    const both = `${db.schema}_both`;
    try {
      await db.pool.query(`CREATE SCHEMA "${deferrable}"`);
      await db.pool.query(`CREATE TABLE "${deferrable}"."idempotency_keys" (key text PRIMARY KEY DEFERRABLE, ${columns})`);
      // A unique index built CONCURRENTLY that failed (duplicates at the time) stays behind, invalid.
      await db.pool.query(`CREATE SCHEMA "${invalid}"`);
      await db.pool.query(`CREATE TABLE "${invalid}"."idempotency_keys" (key text NOT NULL, ${columns})`);
      await db.pool.query(`INSERT INTO "${invalid}"."idempotency_keys" (key, state, expires_at) VALUES ('k', 'completed', now()), ('k', 'completed', now())`);
      await expect(db.pool.query(`CREATE UNIQUE INDEX CONCURRENTLY ON "${invalid}"."idempotency_keys" (key)`)).rejects.toThrow(/could not create unique index/);
      await db.pool.query(`DELETE FROM "${invalid}"."idempotency_keys"`);
      await db.pool.query(`CREATE SCHEMA "${both}"`);
      await db.pool.query(`CREATE TABLE "${both}"."idempotency_keys" (key text PRIMARY KEY DEFERRABLE, ${columns})`);
      await db.pool.query(`CREATE UNIQUE INDEX ON "${both}"."idempotency_keys" (key)`);
      for (const schema of [deferrable, invalid, both]) {
        const s = createPostgresStore({ pool: db.pool, schema });
        await expect(s.migrate()).rejects.toThrow(/"idempotency_keys" is not an idemkit table: no unique index on key alone that begin's ON CONFLICT \(key\) can use/);
        await expect(s.begin(key(), 'fp', 10_000)).rejects.toThrow(/ON CONFLICT/);
      }
    } finally {
      await db.pool.query(`DROP SCHEMA IF EXISTS "${deferrable}", "${invalid}", "${both}" CASCADE`);
    }
  });

  it('refuses, naming the clash, when another relation already has the expiry index\'s name (purges would scan the whole table)', async () => {
    const schema = `${db.schema}_clash`;
    try {
      await db.pool.query(`CREATE SCHEMA "${schema}"`);
      await db.pool.query(`CREATE TABLE "${schema}"."orders_expires_at_idx" (id int)`);
      const s = createPostgresStore({ pool: db.pool, schema, table: 'orders' });
      // Before: resolved, and the table had its primary key only.
      await expect(s.migrate()).rejects.toThrow(/"orders_expires_at_idx" exists but is not the expiry index on .*"orders"/);
      const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM pg_tables WHERE schemaname = $1', [schema]);
      expect(rows[0]).toEqual({ n: 1 }); // rolled back: no half-made table either
    } finally {
      await db.pool.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    }
  });

  it('long table names each get their own expires_at index, next to each other in one schema', async () => {
    const schema = `${db.schema}_long`;
    const base = `t${'x'.repeat(47)}`; // 48 bytes: its index name is exactly 63 bytes
    // 62 and 63 bytes, a 63-byte name that starts like the 48-byte one, and two 63-byte names
    // that share their first 48 bytes: no two of them may end up with one index name.
    const tables = [`t${'y'.repeat(61)}`, `t${'z'.repeat(62)}`, base, `${base}_orders_archive`, `${base}_orders_archivf`];
    try {
      for (const table of tables) {
        await createPostgresStore({ pool: db.pool, schema, table }).migrate();
        await createPostgresStore({ pool: db.pool, schema, table }).migrate(); // and again, idempotently
      }
      for (const table of tables) {
        expect(Buffer.byteLength(table)).toBeLessThanOrEqual(63);
        const { rows } = await db.pool.query<{ indexdef: string }>('SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = $2', [schema, table]);
        // Purges and takeovers find records by expiry: without it they scan the whole table.
        expect(rows.filter((r) => r.indexdef.includes('(expires_at)')), table).toHaveLength(1);
      }
    } finally {
      await db.pool.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    }
  });

  it('runs no DDL when the table is there: an app role without CREATE can call it on every boot', async () => {
    const schema = `${db.schema}_app`;
    const role = `idemkit_app_${randomUUID().slice(0, 8)}`;
    await createPostgresStore({ pool: db.pool, schema }).migrate();
    const app = await poolAsNewRole(role);
    try {
      await db.pool.query(`GRANT USAGE ON SCHEMA "${schema}" TO ${role}`);
      await db.pool.query(`GRANT SELECT, INSERT, UPDATE, DELETE ON "${schema}".idempotency_keys TO ${role}`);
      const store = createPostgresStore({ pool: app, schema });
      // Before, CREATE TABLE IF NOT EXISTS failed with 42501 (permission denied for schema).
      await store.migrate();
      const begun = await store.begin(key(), 'fp', 10_000);
      expect(begun.kind).toBe('acquired');
    } finally {
      await app.end();
      await db.pool.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
      await db.pool.query(`DROP OWNED BY ${role}`);
      await db.pool.query(`DROP ROLE ${role}`);
    }
  });

  it('a role without CREATE and no table yet: migrate() says which table and what to do, not just "permission denied"', async () => {
    const role = `${TEST_PREFIX}nocreate_${randomUUID().slice(0, 8)}`;
    const app = await poolAsNewRole(role);
    try {
      await db.pool.query(`GRANT USAGE ON SCHEMA "${db.schema}" TO "${role}"`);
      // A schema it may use but not create in, and a schema that is missing (CREATE on the database needed).
      for (const schema of [db.schema, `${db.schema}_missing`]) {
        const s = createPostgresStore({ pool: app, schema, table: 'not_there_yet' });
        const error = await s.migrate().then(() => undefined, (e: unknown) => e);
        expect(error).toMatchObject({ code: '42501', message: expect.stringContaining(s.table) });
        expect((error as Error).message).toMatch(/sql\/schema\.sql/);
        expect((error as Error).cause).toMatchObject({ code: '42501' });
      }
      expect(app.totalCount - app.idleCount).toBe(0);
    } finally {
      await app.end();
      await db.pool.query(`REVOKE ALL ON SCHEMA "${db.schema}" FROM "${role}"`);
      await db.pool.query(`DROP ROLE "${role}"`);
    }
  });

  it('a role without USAGE or rights on an existing table: migrate() names the grants missing, and running them is enough', async () => {
    const schema = `${db.schema}_granted`;
    const role = `${TEST_PREFIX}nogrant_${randomUUID().slice(0, 8)}`;
    await createPostgresStore({ pool: db.pool, schema }).migrate();
    const app = await poolAsNewRole(role);
    try {
      const store = createPostgresStore({ pool: app, schema });
      // Before: "this role may not create …" (it exists; CREATE was never the point).
      const noUsage = await store.migrate().then(() => undefined, (e: unknown) => e);
      expect(noUsage).toMatchObject({ code: '42501', message: expect.stringContaining(`GRANT USAGE ON SCHEMA "${schema}" TO "${role}";`) });
      expect((noUsage as Error).message).toContain(`GRANT SELECT, INSERT, UPDATE, DELETE ON ${store.table} TO "${role}";`);
      expect((noUsage as Error).message).not.toMatch(/may not create/);
      await db.pool.query(`GRANT USAGE ON SCHEMA "${schema}" TO "${role}"`);
      await db.pool.query(`GRANT SELECT ON ${store.table} TO "${role}"`);
      // Before: migrate() passed here, and then every begin failed with "permission denied for table".
      const noRights = await store.migrate().then(() => undefined, (e: unknown) => e);
      expect(noRights).toMatchObject({ code: '42501' });
      const grants = /run: (.*)$/.exec((noRights as Error).message)?.[1] ?? '';
      expect(grants).toBe(`GRANT INSERT, UPDATE, DELETE ON ${store.table} TO "${role}";`);
      await db.pool.query(grants);
      await store.migrate();
      expect((await store.begin(key(), 'fp', 10_000)).kind).toBe('acquired');
      expect(await store.purgeExpired()).toBe(0);
      expect(app.totalCount - app.idleCount).toBe(0);
    } finally {
      await app.end();
      await db.pool.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
      await db.pool.query(`DROP OWNED BY "${role}"`);
      await db.pool.query(`DROP ROLE "${role}"`);
    }
  });

  // Was: the schema was created when missing unless it was `public`, which hardened databases
  // drop: migrate() failed with the bare 'schema "public" does not exist'.
  it('creates a missing public schema, as it does any other', async () => {
    const admin = new pg.Pool({ connectionString: db.url, max: 1 });
    const database = `${TEST_PREFIX}nopublic_${randomUUID().replaceAll('-', '').slice(0, 12)}`;
    await admin.query(`CREATE DATABASE "${database}"`);
    const url = new URL(db.url);
    url.pathname = `/${database}`;
    const s = createPostgresStore({ connectionString: url.toString() });
    try {
      await s.pool.query('DROP SCHEMA public');
      await s.migrate();
      const k = key();
      const first = await s.begin(k, 'fp', 10_000);
      if (first.kind !== 'acquired') throw new Error('expected acquired');
      expect(await s.complete(k, first.token, response, 60_000)).toBe(true);
      expect((await s.get(k))?.response?.status).toBe(201);
    } finally {
      await s.close();
      await admin.query(`DROP DATABASE IF EXISTS "${database}" WITH (FORCE)`);
      await admin.end();
    }
  });

  it('ships sql/schema.sql with exactly the DDL migrate() runs', async () => {
    const file = await readFile(new URL('../sql/schema.sql', import.meta.url), 'utf8');
    expect(file).toBe(schemaFileText());
  });

  it('sql/schema.sql and migrate() produce the same table', async () => {
    const fileSchema = `${db.schema}_file`;
    const file = await readFile(new URL('../sql/schema.sql', import.meta.url), 'utf8');
    const client = await db.pool.connect();
    try {
      await client.query(`CREATE SCHEMA "${fileSchema}"`);
      await client.query(`SET search_path TO "${fileSchema}"`);
      await client.query(file);
      await client.query('RESET search_path');
    } finally {
      client.release();
    }
    try {
      const describeTable = async (schema: string) => {
        const columns = await db.pool.query(
          `SELECT column_name, data_type, is_nullable, column_default, collation_name, ordinal_position
           FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'idempotency_keys' ORDER BY ordinal_position`,
          [schema],
        );
        const constraints = await db.pool.query(
          `SELECT conname, pg_get_constraintdef(c.oid) AS def FROM pg_constraint c
           JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
           WHERE n.nspname = $1 AND t.relname = 'idempotency_keys' ORDER BY conname`,
          [schema],
        );
        // Index definitions name the schema; strip it so the two schemas compare equal.
        const indexes = await db.pool.query(
          `SELECT indexname, replace(indexdef, $1, '') AS def FROM pg_indexes WHERE schemaname = $2 ORDER BY indexname`,
          [`${schema}.`, schema],
        );
        return { columns: columns.rows, constraints: constraints.rows, indexes: indexes.rows };
      };
      const fromFile = await describeTable(fileSchema);
      const fromMigrate = await describeTable(db.schema);
      expect(fromFile.columns).toHaveLength(10);
      expect(fromFile.indexes).toHaveLength(2);
      expect(fromFile).toEqual(fromMigrate);
    } finally {
      await db.pool.query(`DROP SCHEMA "${fileSchema}" CASCADE`);
    }
  });
});

describe('begin', () => {
  it('two separate pools racing 200 begins on one key: exactly one winner', async () => {
    const a = new pg.Pool({ connectionString: db.url, max: 20 });
    const b = new pg.Pool({ connectionString: db.url, max: 20 });
    const sa = createPostgresStore({ pool: a, schema: db.schema });
    const sb = createPostgresStore({ pool: b, schema: db.schema });
    try {
      // Warm both pools so the race is between statements, not connection setup.
      await Promise.all([...Array.from({ length: 20 }, () => a.query('SELECT 1')), ...Array.from({ length: 20 }, () => b.query('SELECT 1'))]);
      for (let round = 0; round < 5; round++) {
        const k = key();
        const results = await Promise.all(
          Array.from({ length: 200 }, (_, i) => (i % 2 === 0 ? sa : sb).begin(k, 'fp', 30_000)),
        );
        const winners = results.filter((r) => r.kind === 'acquired');
        expect(winners).toHaveLength(1);
        const losers = results.filter((r) => r.kind === 'existing');
        expect(losers).toHaveLength(199);
        for (const r of losers) {
          expect(r.record.state).toBe('in_progress');
          expect(r.record.fingerprint).toBe('fp');
          expect(r.leaseRemainingMs).toBeGreaterThan(25_000);
          expect(r.leaseRemainingMs).toBeLessThanOrEqual(30_000);
        }
      }
    } finally {
      await Promise.all([a.end(), b.end()]);
    }
  });

  // Was: under REPEATABLE READ or SERIALIZABLE (a server's or role's default isolation), a begin
  // whose conflicting row committed after its snapshot failed with 40001, and its duplicate
  // request got a 503 instead of a 409 or the replay (82 of 500 begins); so did a complete
  // racing its own lease's renewal.
  it.each(['repeatable read', 'serializable'])('under %s by default: racing begins on one key have one winner and no errors, and complete beside renew holds', async (isolation) => {
    const pools = [0, 1].map(() => new pg.Pool({ connectionString: db.url, max: 20, options: `-c default_transaction_isolation=${isolation.replace(' ', '\\ ')}` }));
    const [sa, sb] = pools.map((pool) => createPostgresStore({ pool, schema: db.schema }));
    try {
      const { rows } = await pools[0]!.query<{ level: string }>("SELECT current_setting('transaction_isolation') AS level");
      expect(rows[0]?.level).toBe(isolation);
      for (let round = 0; round < 5; round++) {
        const k = key();
        const results = await Promise.allSettled(Array.from({ length: 100 }, (_, i) => (i % 2 === 0 ? sa! : sb!).begin(k, 'fp', 30_000)));
        expect(results.filter((r) => r.status === 'rejected').map((r) => String((r as PromiseRejectedResult).reason))).toEqual([]);
        const kinds = results.map((r) => (r as PromiseFulfilledResult<{ kind: string }>).value.kind);
        expect(kinds.filter((kind) => kind === 'acquired')).toHaveLength(1);
      }
      for (let round = 0; round < 20; round++) {
        const k = key();
        const first = await sa!.begin(k, 'fp', 30_000);
        if (first.kind !== 'acquired') throw new Error('expected acquired');
        // Neither call rejects (Promise.all would); the renewal may land before the completion
        // (true) or after it (false: the record is completed), so only the completion is asserted.
        const [, completed] = await Promise.all([sb!.renew(k, first.token, 30_000), sa!.complete(k, first.token, response, 60_000)]);
        expect(completed).toBe(true);
        const stored = await sa!.get(k);
        expect(stored?.state).toBe('completed');
        expect(stored?.response?.status).toBe(response.status);
      }
    } finally {
      await Promise.all(pools.map((pool) => pool.end()));
    }
  });

  it('200 racing begins on an expired lease: exactly one takes it over', async () => {
    const k = key();
    const first = await store.begin(k, 'old', 150);
    expect(first.kind).toBe('acquired');
    await vi.waitFor(async () => expect(await store.get(k)).toBeUndefined(), { timeout: 5_000, interval: 20 });
    const results = await Promise.all(Array.from({ length: 200 }, () => store.begin(k, 'new', 30_000)));
    const winners = results.filter((r) => r.kind === 'acquired');
    expect(winners).toEqual([expect.objectContaining({ kind: 'acquired', tookOver: true })]);
    const record = await store.get(k);
    expect(record?.fingerprint).toBe('new');
    if (first.kind === 'acquired') expect(await store.complete(k, first.token, response, 60_000)).toBe(false);
  });

  // Retry-After comes from it: a begin that waited for a racing claim's insert counts the lease
  // left from when it answered, not from when it was sent.
  it('a begin that waited on a racing claim reports the lease left when it answered', async () => {
    const k = key();
    const locker = await db.pool.connect();
    try {
      // Another app server's begin, its insert not yet committed: ours waits on the key's index.
      await locker.query('BEGIN');
      await locker.query(buildQueries(store.table).begin, [k, 'fp', randomUUID(), 5_000]);
      const waiting = store.begin(k, 'fp', 5_000);
      await new Promise((resolve) => setTimeout(resolve, 600)); // how long ours waits on it
      const released = Date.now();
      await locker.query('COMMIT');
      const second = await waiting;
      if (second.kind !== 'existing') throw new Error('expected existing');
      const leaseEnd = (await store.get(k))?.leaseExpiresAt ?? 0;
      expect(second.leaseRemainingMs).toBeGreaterThan(0);
      expect(second.leaseRemainingMs).toBeLessThanOrEqual(leaseEnd - released + 100);
    } finally {
      locker.release();
    }
  });

  it('returns the live completed record with its response, and leaseRemainingMs 0', async () => {
    const k = key();
    const first = await store.begin(k, 'fp', 10_000);
    if (first.kind !== 'acquired') throw new Error('expected acquired');
    expect(first.tookOver).toBe(false);
    const body = Uint8Array.from([0, 255, 1, 128, 10, 13]);
    expect(await store.complete(k, first.token, { status: 200, headers: [['set-cookie', 'a=1'], ['set-cookie', 'b=2']], body }, 60_000)).toBe(true);
    const again = await store.begin(k, 'fp', 10_000);
    expect(again).toMatchObject({ kind: 'existing', leaseRemainingMs: 0, record: { state: 'completed', leaseExpiresAt: null } });
    if (again.kind !== 'existing') return;
    expect(again.record.response?.headers).toEqual([['set-cookie', 'a=1'], ['set-cookie', 'b=2']]);
    expect(again.record.response?.body).toEqual(body);
    expect(again.record.expiresAt - again.record.createdAt).toBeGreaterThanOrEqual(59_000);
  });
});

describe('keys longer than a primary-key entry can hold (2704 bytes)', () => {
  it('a long scope (a bearer token as the tenant) is stored and replayed, and kept apart from another tenant', async () => {
    // Before, such a scoped key failed every begin ("index row size … exceeds btree version 4
    // maximum 2704"): every request of that tenant was a 503, or ran without idempotency with
    // onStoreError: 'pass'.
    const tokens = [randomBytes(3000).toString('base64url'), randomBytes(3000).toString('base64url')];
    let runs = 0;
    const request = (tenant: number) => ({ method: 'POST', path: '/charges', headers: { 'idempotency-key': 'charge-1', authorization: tokens[tenant] }, body: { cents: 100 } });
    const engine = createIdempotencyEngine({ store, logger: false, scope: (req) => req.headers.authorization as string });
    for (const tenant of [0, 1]) {
      const first = await engine.decide(request(tenant));
      expect(first.kind).toBe('run');
      if (first.kind !== 'run') return;
      runs++;
      expect(await first.lease.commit({ status: 201, headers: [], body: bytes(`charged for tenant ${tenant}`) })).toBe(true);
    }
    for (const tenant of [0, 1]) {
      const retry = await engine.decide(request(tenant));
      expect(retry.kind).toBe('replay');
      if (retry.kind === 'replay') expect(new TextDecoder().decode(retry.response.body)).toBe(`charged for tenant ${tenant}`);
    }
    expect(runs).toBe(2);
  });

  it('every operation works on a long key, in and out of a transaction; a key cannot pose as another\'s digest', async () => {
    const long = `k:é${randomBytes(3000).toString('base64url')}`;
    const first = await store.begin(long, 'fp', 10_000);
    if (first.kind !== 'acquired') throw new Error('expected acquired');
    expect(await store.renew(long, first.token, 10_000)).toBe(true);
    expect((await store.get(long))?.state).toBe('in_progress');
    expect(await store.release(long, first.token)).toBe(true);
    const second = await store.begin(long, 'fp', 10_000);
    if (second.kind !== 'acquired') throw new Error('expected acquired');
    const tx = await store.beginTransaction();
    expect(await tx.complete(long, second.token, response, 60_000)).toBe(true);
    expect(await store.begin(long, 'fp', 10_000)).toMatchObject({ kind: 'existing', record: { key: long, state: 'completed' } });
    const posing = `#sha256:${createHash('sha256').update(long).digest('hex')}`;
    const posed = await store.begin(posing, 'other', 10_000);
    if (posed.kind !== 'acquired') throw new Error('a key posing as a digest met the long key\'s record');
    // Given back: a claim left to expire would count in the purge test's batches.
    expect(await store.release(posing, posed.token)).toBe(true);
  });
});

describe('one round trip per operation', () => {
  it('begin + complete = 2 statements on a new key, 1 on a replay; each other operation 1', async () => {
    const counted = countingPool(db.url, 2);
    const s = createPostgresStore({ pool: counted.pool, schema: db.schema });
    try {
      await counted.pool.query('SELECT 1'); // connect before counting
      counted.reset();
      const k = key();
      const first = await s.begin(k, 'fp', 10_000);
      if (first.kind !== 'acquired') throw new Error('expected acquired');
      expect(await s.renew(k, first.token, 10_000)).toBe(true);
      expect(await s.complete(k, first.token, response, 60_000)).toBe(true);
      expect(counted.count()).toBe(3);
      counted.reset();
      expect((await s.begin(k, 'fp', 10_000)).kind).toBe('existing');
      expect(counted.count()).toBe(1);
      counted.reset();
      await s.get(k);
      await s.release(k, first.token);
      await s.purgeExpired(10);
      expect(counted.count()).toBe(3);
    } finally {
      await counted.pool.end();
    }
  });
});

describe('purgeExpired', () => {
  it('removes 100 000 expired rows in bounded batches and leaves live rows untouched', async () => {
    const table = db.table();
    await db.pool.query(
      `INSERT INTO ${table} (key, fingerprint, state, response_status, response_headers, response_body, created_at, expires_at)
       SELECT 'purge:' || g, 'fp', 'completed', 200, '[]'::jsonb, '\\x00'::bytea, now() - interval '2 days', now() - interval '1 day'
       FROM generate_series(1, 100000) AS g`,
    );
    const live: string[] = [];
    for (let i = 0; i < 20; i++) {
      const k = key();
      live.push(k);
      const r = await store.begin(k, 'fp', 60_000);
      if (r.kind === 'acquired' && i % 2 === 0) await store.complete(k, r.token, response, 3_600_000);
    }
    const batches: number[] = [];
    for (;;) {
      const n = await store.purgeExpired(5_000);
      if (n === 0) break;
      batches.push(n);
    }
    expect(batches.reduce((a, b) => a + b, 0)).toBe(100_000);
    expect(batches).toHaveLength(20);
    expect(Math.max(...batches)).toBe(5_000);
    for (const k of live) expect(await store.get(k)).toBeDefined();
    const { rows } = await db.pool.query(`SELECT count(*)::int AS n FROM ${table} WHERE key LIKE 'purge:%'`);
    expect(rows[0]).toEqual({ n: 0 });
  });

  it('skips an expired row another session holds locked, and deletes the rest at once', async () => {
    const purger = createPostgresStore({ pool: db.pool, schema: db.schema, queryTimeoutMs: 3_000 });
    const keys = Array.from({ length: 5 }, key);
    for (const k of keys) await purger.begin(k, null, 1);
    await vi.waitFor(async () => expect(await purger.get(keys[4]!)).toBeUndefined()); // every lease ran out
    // Another app server's purger mid-batch, or a long transaction, holds one of them.
    const locker = await db.pool.connect();
    try {
      await locker.query('BEGIN');
      await locker.query(`SELECT 1 FROM ${purger.table} WHERE key = $1 FOR UPDATE`, [keys[0]]);
      await expect(purger.purgeExpired(100)).resolves.toBeGreaterThanOrEqual(4);
      const { rows } = await db.pool.query<{ key: string }>(`SELECT key FROM ${purger.table} WHERE key = ANY($1)`, [keys]);
      expect(rows.map((r) => r.key)).toEqual([keys[0]]);
    } finally {
      await locker.query('ROLLBACK');
      locker.release();
    }
  });

  it('uses a TID scan on the batch (no full scan per batch)', async () => {
    // The statement the store sends, not a copy of it.
    const { rows } = await db.pool.query<{ 'QUERY PLAN': string }>(`EXPLAIN ${buildQueries(db.table()).purge}`, [1000]);
    expect(rows.map((r) => r['QUERY PLAN']).join('\n')).toMatch(/Tid Scan/);
  });
});

describe('store failures reject with the driver error', () => {
  it('a backend terminated mid-operation rejects that operation', async () => {
    const pool = new pg.Pool({ connectionString: db.url, max: 1, application_name: 'idemkit-victim' });
    pool.on('error', () => undefined);
    const victim = createPostgresStore({ pool, schema: db.schema });
    const k = key();
    const first = await store.begin(k, 'fp', 30_000);
    if (first.kind !== 'acquired') throw new Error('expected acquired');
    // Hold the row lock so the victim's complete blocks inside the server.
    const holder = await db.pool.connect();
    try {
      await holder.query('BEGIN');
      await holder.query(`SELECT 1 FROM ${db.table()} WHERE key = $1 FOR UPDATE`, [k]);
      const pending = victim.complete(k, first.token, response, 60_000);
      // Handled at once: the victim's error can arrive before the terminate query's own answer,
      // and a rejection left unhandled for that turn fails the run (seen once in CI under load).
      const outcome = pending.then(
        () => 'resolved',
        (error: unknown) => error,
      );
      let pid = 0;
      await vi.waitFor(async () => {
        const { rows } = await db.pool.query<{ pid: number }>(
          "SELECT pid FROM pg_stat_activity WHERE application_name = 'idemkit-victim' AND wait_event_type = 'Lock'",
        );
        expect(rows).toHaveLength(1);
        pid = rows[0]?.pid ?? 0;
      }, { timeout: 10_000 });
      await db.pool.query('SELECT pg_terminate_backend($1)', [pid]);
      expect(await outcome).toMatchObject({ code: '57P01' });
    } finally {
      await holder.query('ROLLBACK');
      holder.release();
      await pool.end();
    }
    // Nothing was written by the failed call.
    expect((await store.get(k))?.state).toBe('in_progress');
  });

  it('a claim whose answer was lost (query_timeout) is given back: the caller saw a failure, so the key is free', async () => {
    const { proxy, through } = await proxied(db.url);
    // 1 s: the give-back's own DELETE runs under the same timeout, and must not hit it.
    const pool = new pg.Pool({ connectionString: through.href, max: 2, query_timeout: 1_000 });
    pool.on('error', () => undefined);
    try {
      const s = createPostgresStore({ pool, schema: db.schema });
      await pool.query('SELECT 1'); // one connection open, idle in the pool
      const k = key();
      proxy.holdAnswers(); // its statements land, their answers never come back
      await expect(s.begin(k, 'fp', 60_000)).rejects.toThrow(/timeout/i);
      // The INSERT committed; the release went out on a new connection after it. Before, the
      // claim stayed for the whole lease and every retry got 409.
      await vi.waitFor(async () => expect(await store.get(k)).toBeUndefined(), { timeout: 3_000, interval: 20 });
      expect(await store.begin(k, 'fp', 60_000)).toMatchObject({ kind: 'acquired', tookOver: false });
    } finally {
      await proxy.close();
      await pool.end();
    }
  });

  it('a connection that goes silent (a network black hole) is given up after queryTimeoutMs, so the store recovers and close() ends', async () => {
    const { proxy, through } = await proxied(db.url);
    const within = <T>(promise: Promise<T>, ms: number): Promise<T | 'still waiting'> =>
      Promise.race([promise, new Promise<'still waiting'>((r) => setTimeout(() => r('still waiting'), ms).unref())]);
    // No query_timeout on the pool: the store's own statements carry one.
    const s = createPostgresStore({ connectionString: through.href, poolOptions: { max: 2 }, schema: db.schema, queryTimeoutMs: 500 });
    try {
      await s.get(key()); // one connection open, idle in the pool
      const k = key();
      proxy.holdAnswers(); // that connection's answers never come back; new connections pass
      // Before: still waiting, for good, and so was every later statement on that connection.
      expect(await within(s.begin(k, 'fp', 60_000).catch((e: unknown) => e), 3_000)).toMatchObject({ message: expect.stringMatching(/Query read timeout/) });
      // The silent connection was discarded; the next statements run on a new one.
      await vi.waitFor(async () => expect(await store.get(k)).toBeUndefined(), { timeout: 3_000, interval: 20 });
      expect(await s.begin(key(), 'fp', 60_000)).toMatchObject({ kind: 'acquired' });
    } finally {
      // Before: close() waited on the silent connection for good.
      expect(await within(s.close().then(() => 'closed'), 3_000)).toBe('closed');
      await proxy.close();
    }
  });

  it('a statement that hit the read timeout is cancelled on the server: a claim held there (a trigger, a lock) never commits late', async () => {
    // A trigger holds such claims for 2 s on the server: past the 1 s read timeout.
    const fn = `${db.schema}.slow_claim`;
    await db.pool.query(`CREATE FUNCTION ${fn}() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF NEW.key LIKE 'slowclaim:%' THEN PERFORM pg_sleep(2); END IF; RETURN NEW; END $$`);
    await db.pool.query(`CREATE TRIGGER slow_claim BEFORE INSERT ON ${store.table} FOR EACH ROW EXECUTE FUNCTION ${fn}()`);
    try {
      const s = createPostgresStore({ pool: db.pool, schema: db.schema, queryTimeoutMs: 1_000 });
      const k = `slowclaim:${randomUUID()}`;
      await expect(s.begin(k, 'fp', 60_000)).rejects.toThrow(/Query read timeout/);
      // Before: the claim committed at 2 s and held the key (409s) until a release caught it.
      for (const until = Date.now() + 2_500; Date.now() < until; ) {
        expect(await store.get(k)).toBeUndefined();
        await new Promise((r) => setTimeout(r, 50));
      }
    } finally {
      await db.pool.query(`DROP TRIGGER slow_claim ON ${store.table}`);
      await db.pool.query(`DROP FUNCTION ${fn}()`);
    }
  }, 20_000);

  it('a timed-out claim is given back once its statement stopped on the server, not again and again for the whole lease', async () => {
    const fn = `${db.schema}.slow_claim2`;
    await db.pool.query(`CREATE FUNCTION ${fn}() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF NEW.key LIKE 'slowclaim2:%' THEN PERFORM pg_sleep(2); END IF; RETURN NEW; END $$`);
    await db.pool.query(`CREATE TRIGGER slow_claim2 BEFORE INSERT ON ${store.table} FOR EACH ROW EXECUTE FUNCTION ${fn}()`);
    const releaseSql = buildQueries(store.table).release;
    const releases: number[] = [];
    const pool = new pg.Pool({ connectionString: db.url, max: 4 });
    pool.on('error', () => undefined);
    pool.on('connect', (client) => {
      const query = client.query.bind(client) as (...args: unknown[]) => unknown;
      (client as unknown as { query: (...args: unknown[]) => unknown }).query = (...args: unknown[]) => {
        const text = typeof args[0] === 'string' ? args[0] : (args[0] as { text?: string }).text;
        if (text === releaseSql) releases.push(Date.now());
        return query(...args);
      };
    });
    const s = createPostgresStore({ pool, schema: db.schema, queryTimeoutMs: 1_000 });
    try {
      const k = `slowclaim2:${randomUUID()}`;
      await expect(s.begin(k, 'fp', 60_000)).rejects.toThrow(/Query read timeout/);
      const failedAt = Date.now();
      await new Promise((r) => setTimeout(r, 6_000));
      // Before: sent at 0, 0.25, 1.25, 4.25 s (then every 5 s until the 60 s lease ended), each
      // finding nothing. Now: the first, then one more once the cancelled claim no longer runs.
      expect(releases.length).toBeGreaterThanOrEqual(1);
      expect(releases.length).toBeLessThanOrEqual(2);
      expect(releases.filter((at) => at - failedAt > 2_000)).toEqual([]);
      expect(await store.get(k)).toBeUndefined();
    } finally {
      await s.close();
      await pool.end();
      await db.pool.query(`DROP TRIGGER slow_claim2 ON ${store.table}`);
      await db.pool.query(`DROP FUNCTION ${fn}()`);
    }
  }, 20_000);

  it('a timed-out claim on sessions this role cannot see (SET ROLE): released on the schedule, not taken as stopped', async () => {
    const id = randomUUID().replaceAll('-', '').slice(0, 12);
    const app = `${TEST_PREFIX}${id}_app`;
    const login = `${TEST_PREFIX}${id}_login`;
    const schema = `${TEST_PREFIX}${id}`;
    await db.pool.query(`CREATE ROLE "${app}" NOLOGIN`);
    await db.pool.query(`CREATE ROLE "${login}" LOGIN`);
    await db.pool.query(`GRANT "${app}" TO "${login}"`);
    await db.pool.query(`CREATE SCHEMA "${schema}" AUTHORIZATION "${app}"`);
    const url = new URL(db.url);
    url.username = login;
    // Logged in as one role, working as another: the server then hides the pool's own sessions'
    // state and query from it, so whether the claim still runs cannot be seen.
    const pool = new pg.Pool({ connectionString: url.href, max: 4 });
    pool.on('error', () => undefined);
    pool.on('connect', (client) => void client.query(`SET ROLE "${app}"`));
    try {
      const s = createPostgresStore({ pool, schema, queryTimeoutMs: 1_000 });
      await s.migrate();
      const fn = `"${schema}".slow_claim3`;
      await db.pool.query(`CREATE FUNCTION ${fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$`);
      await db.pool.query(`CREATE TRIGGER slow_claim3 BEFORE INSERT ON ${s.table} FOR EACH ROW EXECUTE FUNCTION ${fn}()`);
      const k = key();
      const failed = expect(s.begin(k, 'fp', 60_000)).rejects.toThrow(/Query read timeout/);
      // The claim commits at 2 s (the cancel could not see it either); watched until 6 s.
      const states: string[] = [];
      for (const until = Date.now() + 6_000; Date.now() < until; ) {
        const { rows } = await db.pool.query<{ state: string }>(`SELECT state FROM ${s.table} WHERE key = $1`, [k]);
        states.push(rows[0]?.state ?? 'none');
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      await failed;
      // It landed, and a release then deleted it. Before: one look said "not running", one last
      // release came before the commit, and the key answered 409 for its whole lease.
      expect(states).toContain('in_progress');
      expect(states.at(-1)).toBe('none');
      await s.close();
    } finally {
      await pool.end();
      await db.pool.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
      await db.pool.query(`DROP ROLE IF EXISTS "${login}"`);
      await db.pool.query(`DROP ROLE IF EXISTS "${app}"`);
    }
  }, 20_000);

  it('a claim whose connection was cut after it landed is given back once the server can be reached again', async () => {
    const { proxy, through } = await proxied(db.url);
    const pool = new pg.Pool({ connectionString: through.href, max: 2 });
    pool.on('error', () => undefined);
    try {
      const s = createPostgresStore({ pool, schema: db.schema });
      await s.get(key()); // one connection open
      const k = key();
      proxy.holdAnswers(); // the claim lands; its answer never comes back
      const pending = s.begin(k, 'fp', 60_000);
      await vi.waitFor(async () => expect(await store.get(k)).toBeDefined(), { timeout: 3_000, interval: 10 });
      proxy.refuse(true); // a failover: the connection is cut, and the server is out of reach for a while
      proxy.cut();
      await expect(pending).rejects.toThrow();
      await new Promise((r) => setTimeout(r, 600)); // the first releases fail: nothing to connect to
      expect((await store.get(k))?.state).toBe('in_progress');
      proxy.refuse(false);
      // Before: one release, refused, and the key held its 60 s lease (every retry a 409).
      await vi.waitFor(async () => expect(await store.get(k)).toBeUndefined(), { timeout: 8_000, interval: 50 });
      await s.close();
    } finally {
      await proxy.close();
      await pool.end();
    }
  }, 20_000);

  it('a claim that never reached the server (no connection to be had) sends no release: no retries pile on a server that is down', async () => {
    const target = new URL(db.url);
    let attempts = 0;
    let down = true;
    // A hop in front of the real server that counts every connection attempt, and refuses them while down.
    const hop = createServer((socket) => {
      attempts++;
      socket.on('error', () => undefined);
      if (down) return void socket.destroy();
      const upstream = connect(Number(target.port || 5432), target.hostname);
      upstream.on('error', () => socket.destroy());
      socket.on('close', () => upstream.destroy());
      upstream.on('close', () => socket.destroy());
      socket.pipe(upstream).pipe(socket);
    });
    await new Promise<void>((resolve) => hop.listen(0, '127.0.0.1', resolve));
    const through = new URL(db.url);
    through.hostname = '127.0.0.1';
    through.port = String((hop.address() as AddressInfo).port);
    const pool = new pg.Pool({ connectionString: through.href, max: 2 });
    pool.on('error', () => undefined);
    try {
      const s = createPostgresStore({ pool, schema: db.schema });
      const k = key();
      await expect(s.begin(k, 'fp', 60_000)).rejects.toThrow();
      // Before: a release was sent at once, and again 250 ms and 1 s later (then every 5 s for the
      // whole lease), each one more connection attempt on the server that was down.
      await new Promise((r) => setTimeout(r, 1_500));
      expect(attempts).toBe(1);
      down = false;
      expect((await s.begin(k, 'fp', 60_000)).kind).toBe('acquired');
      await s.close();
    } finally {
      await pool.end();
      await new Promise((resolve) => hop.close(resolve));
    }
  }, 20_000);

  it('a claim the server refused (a read-only server: a standby, default_transaction_read_only) sends no release: no connection churn while it stays read-only', async () => {
    // Per session on this pool only: what a demoted primary behind the same address, a standby,
    // or `ALTER DATABASE … SET default_transaction_read_only = on` (a full disk, maintenance) gives.
    const pool = new pg.Pool({ connectionString: db.url, max: 4, options: '-c default_transaction_read_only=on' });
    pool.on('error', () => undefined);
    let connections = 0;
    pool.on('connect', () => void connections++);
    try {
      const s = createPostgresStore({ pool, schema: db.schema });
      const k = key();
      await expect(s.begin(k, 'fp', 60_000)).rejects.toMatchObject({ code: '25006' });
      // An ERROR for the statement: its transaction rolled back, so no claim landed. Before, a
      // release was sent at once and again 250 ms and 1 s later (then every 5 s for the whole
      // lease), each one failing with 25006 and costing a new connection: 15 for every request
      // refused while the server stayed read-only.
      await new Promise((r) => setTimeout(r, 1_500));
      expect(connections).toBe(1);
      await s.close();
    } finally {
      await pool.end();
    }
  }, 20_000);

  it('read-only connections kept idle in the pool (a failover behind one address) are dropped after one failure each: the store recovers without a restart', async () => {
    // Every connection opened while `readOnly` is set behaves as one to a demoted primary or a
    // standby would; the pool keeps them idle, as it would across a DNS move.
    let readOnly = true;
    const pool = new pg.Pool({ connectionString: db.url, max: 3 });
    pool.on('error', () => undefined);
    opensReadOnlyWhile(pool, () => readOnly);
    try {
      const s = createPostgresStore({ pool, schema: db.schema });
      const held = await Promise.all([pool.connect(), pool.connect(), pool.connect()]);
      for (const client of held) client.release();
      expect(pool.idleCount).toBe(3);
      readOnly = false; // the address now leads to a writable primary
      const codes: unknown[] = [];
      for (let i = 0; i < 6; i++) {
        const outcome = await s.begin(key(), 'fp', 10_000).then(
          (result) => result.kind,
          (error: { code?: unknown }) => error.code,
        );
        codes.push(outcome);
      }
      // Each read-only connection fails one statement and is destroyed, not handed out again.
      expect(codes).toEqual(['25006', '25006', '25006', 'acquired', 'acquired', 'acquired']);
      await s.close();
    } finally {
      await pool.end();
    }
  });

  // One such connection: the release failed with 25006 and the key stayed claimed (409 for a
  // lease). Several (a failover, the handler's reads two at once): the one resend that fixed the
  // first case met the second.
  it.each([
    ['one read-only connection', 1],
    ['several read-only connections (a failover)', 2],
  ])("%s the app's own reads left on top of the pool do not keep a failed handler's key claimed for the lease", async (_what, staleCount) => {
    let readOnly = false;
    const pool = new pg.Pool({ connectionString: db.url, max: 4 });
    pool.on('error', () => undefined);
    opensReadOnlyWhile(pool, () => readOnly);
    try {
      const s = createPostgresStore({ pool, schema: db.schema });
      const engine = createIdempotencyEngine({ store: s, logger: false });
      const request: IncomingRequest = { method: 'POST', path: '/orders', headers: { 'idempotency-key': key() }, body: { sku: 'A1' } };
      const decision = await engine.decide(request);
      if (decision.kind !== 'run') throw new Error(`expected run, got ${decision.kind}`);
      // The handler reads through the pool on connections opened while the address led to the
      // old primary: a read succeeds there, and those connections go back on top of the pool.
      readOnly = true;
      const writable = await pool.connect();
      const stale = [];
      for (let i = 0; i < staleCount; i++) stale.push(await pool.connect());
      readOnly = false;
      writable.release();
      for (const client of stale) {
        await client.query('SELECT 1');
        client.release();
      }
      expect(pool.idleCount).toBe(staleCount + 1);
      // Then the handler throws: the engine releases the key, through the read-only connections.
      await decision.lease.abandon('handler-threw');
      const retry = await engine.decide(request);
      expect(retry.kind).toBe('run');
      if (retry.kind === 'run') await retry.lease.abandon('client-gone');
      await s.close();
    } finally {
      await pool.end();
    }
  });

  it('a release on a server that is read-only itself is sent twice, then fails with 25006', async () => {
    const pool = new pg.Pool({ connectionString: db.url, max: 4 });
    pool.on('error', () => undefined);
    opensReadOnlyWhile(pool, () => true);
    let opened = 0;
    pool.on('connect', () => void opened++);
    try {
      const s = createPostgresStore({ pool, schema: db.schema });
      const failed = await s.release(key(), 'token' as LeaseToken).then(
        () => undefined,
        (error: { code?: unknown }) => error.code,
      );
      expect(failed).toBe('25006');
      expect(opened).toBe(2);
      await s.close();
    } finally {
      await pool.end();
    }
  });

  it('stores sharing one pool share one listener on it (no MaxListeners warning with many stores)', async () => {
    const pool = new pg.Pool({ connectionString: db.url, max: 1 });
    try {
      const before = pool.listenerCount('release');
      for (let i = 0; i < 13; i++) createPostgresStore({ pool, schema: db.schema });
      expect(pool.listenerCount('release')).toBe(before + 1);
    } finally {
      await pool.end();
    }
  });

  it('statements that time out behind a table lock leave no server connection waiting on it', async () => {
    const application_name = `idemkit-lock-${randomUUID().slice(0, 8)}`;
    const pool = new pg.Pool({ connectionString: db.url, max: 4, application_name });
    pool.on('error', () => undefined);
    const locker = await db.pool.connect();
    try {
      const s = createPostgresStore({ pool, schema: db.schema, queryTimeoutMs: 300 });
      await locker.query('BEGIN');
      await locker.query(`LOCK TABLE ${store.table} IN EXCLUSIVE MODE`); // a migration, say
      const keys = Array.from({ length: 4 }, () => key());
      const results = await Promise.allSettled(keys.map((k) => s.begin(k, 'fp', 30_000)));
      expect(results.every((r) => r.status === 'rejected')).toBe(true);
      // Before: every timed-out begin, and each release sent after it, went on waiting on the
      // server (one backend each, up to max_connections), and the claims committed after the lock.
      const waiting = async (): Promise<number> =>
        Number((await db.pool.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'", [application_name])).rows[0]?.n);
      await vi.waitFor(async () => expect(await waiting()).toBe(0), { timeout: 5_000, interval: 50 });
      await locker.query('COMMIT');
      await new Promise((r) => setTimeout(r, 300));
      for (const k of keys) expect(await store.get(k)).toBeUndefined();
      await s.close();
    } finally {
      await locker.query('ROLLBACK').catch(() => undefined);
      locker.release();
      await pool.end();
    }
  }, 20_000);

  it('queryTimeoutMs: refused when not a positive integer; a pool with its own query_timeout keeps it', async () => {
    expect(() => createPostgresStore({ pool: db.pool, queryTimeoutMs: 0 })).toThrow(/`queryTimeoutMs` must be a positive integer/);
    expect(() => createPostgresStore({ pool: db.pool, queryTimeoutMs: 1.5 })).toThrow(/`queryTimeoutMs`/);
    const { proxy, through } = await proxied(db.url);
    const pool = new pg.Pool({ connectionString: through.href, max: 1, query_timeout: 300 });
    pool.on('error', () => undefined);
    try {
      const s = createPostgresStore({ pool, schema: db.schema });
      await s.get(key());
      proxy.holdAnswers();
      const started = performance.now();
      await expect(s.get(key())).rejects.toThrow(/Query read timeout/);
      // The pool's 300 ms, not the store's 10 s default.
      expect(performance.now() - started).toBeLessThan(5_000);
    } finally {
      await proxy.close();
      await pool.end();
    }
  });

  it('an ended pool rejects every operation', async () => {
    const pool = new pg.Pool({ connectionString: db.url, max: 1 });
    const s = createPostgresStore({ pool, schema: db.schema });
    await pool.end();
    await expect(s.begin(key(), 'fp', 1_000)).rejects.toThrow(/Cannot use a pool after calling end/);
    await expect(s.complete(key(), 'x' as LeaseToken, response, 1_000)).rejects.toThrow(/after calling end/);
    await expect(s.beginTransaction()).rejects.toThrow(/after calling end/);
  });

  it('a missing table rejects with its code (undefined_table) and says to call migrate()', async () => {
    const s = createPostgresStore({ pool: db.pool, schema: db.schema, table: 'not_migrated' });
    const error = await s.begin(key(), 'fp', 1_000).catch((e: unknown) => e);
    expect(error).toMatchObject({ code: '42P01', cause: { code: '42P01' } });
    expect((error as Error).message).toMatch(/"not_migrated" does not exist: call `await store.migrate\(\)` once at startup, or apply sql\/schema.sql/);
  });
});

describe("bytea_output = 'escape' (a server or role set so)", () => {
  it('a body as large as maxResponseBytes is read back, not the end of the process', () => {
    // The text the driver hands over for 127 MiB of printable bytes (one character each), the
    // 256 byte values in front. Was: "Fatal JavaScript invalid size error", the process gone.
    const head = Array.from({ length: 256 }, (_, b) => (b === 0x5c ? '\\\\' : b >= 0x20 && b <= 0x7e ? String.fromCharCode(b) : `\\${b.toString(8).padStart(3, '0')}`)).join('');
    const parsed = parseBytea(head + 'a'.repeat(store.maxResponseBytes - 256));
    expect(parsed.byteLength).toBe(store.maxResponseBytes);
    expect([...parsed.subarray(0, 256)]).toEqual(Array.from({ length: 256 }, (_, b) => b));
    expect(parsed[parsed.byteLength - 1]).toBe(0x61);
  });

  it('replays every byte value, and a large body without stalling the process', async () => {
    const escaped = new pg.Pool({ connectionString: db.url, max: 2, options: '-c bytea_output=escape' });
    escaped.on('error', () => undefined);
    try {
      const s = createPostgresStore({ pool: escaped, schema: db.schema });
      const check = await escaped.query<{ bytea_output: string }>('SHOW bytea_output');
      expect(check.rows[0]!.bytea_output).toBe('escape');
      const every = Uint8Array.from({ length: 512 }, (_, i) => i % 256);
      // A text export (printable bytes, backslashes among them: one or two characters a byte).
      const large = new Uint8Array(randomBytes(16 * 1024 * 1024)).map((b) => 0x20 + (b % 95));
      for (const body of [every, large]) {
        const k = key();
        const begun = await s.begin(k, null, 60_000);
        if (begun.kind !== 'acquired') throw new Error('expected acquired');
        expect(await s.complete(k, begun.token, { status: 200, headers: [], body }, 60_000)).toBe(true);
        // The CPU the process spends reading the record back (the driver parses the row on the
        // event loop, so every other request of the process waits that long). CPU, not wall time:
        // a busy machine stretches the latter.
        const cpu = process.cpuUsage();
        const record = await s.get(k);
        const again = await s.begin(k, null, 60_000);
        const { user, system } = process.cpuUsage(cpu);
        expect(Buffer.compare(Buffer.from(record!.response!.body), Buffer.from(body))).toBe(0);
        if (again.kind !== 'existing') throw new Error('expected existing');
        expect(Buffer.compare(Buffer.from(again.record.response!.body), Buffer.from(body))).toBe(0);
        // Was: about 10 s of CPU for these two reads (a number[] grown a byte at a time).
        expect((user + system) / 1000).toBeLessThan(4_000);
      }
    } finally {
      await escaped.end();
    }
  }, 60_000);
});

describe('extra_float_digits below 0 (a server or role set so; it goes down to -15)', () => {
  it('times come back exact: a lease and a TTL are what was asked, not rounded to a few significant digits', async () => {
    // Set on the connection as a role or database setting would be. Before, epoch ms travelled as
    // float8 text with 15 + extra_float_digits significant digits: at -15 a record created now
    // read as created years from now, with a TTL of 0 and a lease of 1000 ms instead of 1234.
    const pool = new pg.Pool({ connectionString: db.url, max: 2, options: '-c extra_float_digits=-15' });
    try {
      const own = createPostgresStore({ pool, schema: db.schema });
      const k = key();
      const begun = await own.begin(k, 'fp', 1_234_000);
      if (begun.kind !== 'acquired') throw new Error('expected acquired');
      const running = await own.begin(k, 'fp', 1_234_000);
      if (running.kind !== 'existing') throw new Error('expected existing');
      expect(running.leaseRemainingMs).toBeGreaterThan(1_200_000);
      expect(running.leaseRemainingMs).toBeLessThanOrEqual(1_234_000);
      expect(running.record.leaseExpiresAt! - running.record.createdAt).toBe(1_234_000);
      expect(await own.complete(k, begun.token, { status: 201, headers: [], body: new Uint8Array([1]) }, 3_600_000)).toBe(true);
      const done = await own.get(k);
      expect(Math.abs(done!.createdAt - Date.now())).toBeLessThan(600_000);
      expect(done!.expiresAt - done!.createdAt).toBeGreaterThanOrEqual(3_600_000);
      expect(done!.expiresAt - done!.createdAt).toBeLessThan(3_600_000 + 600_000);
    } finally {
      await pool.end();
    }
  });
});
