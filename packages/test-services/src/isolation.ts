import { randomBytes } from 'node:crypto';
import pg from 'pg';

/** 10 hex chars: unique enough across parallel files and reruns against the same server. */
export function uniqueSuffix(): string {
  return randomBytes(5).toString('hex');
}

function slug(name: string, max: number): string {
  const s = name
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, '_')
    .replace(/^_+|_+$/g, '')
    .slice(0, max);
  return s === '' ? 't' : s;
}

/**
 * A Redis key prefix of its own for one test file, e.g. `idemkit-test:store_conformance:1a2b3c4d5e:`.
 * No `{hash tag}` on purpose: a tag would pin every key to one slot and hide cross-slot behaviour
 * on a cluster. Clean up with SCAN MATCH `${prefix}*` if a test needs to.
 */
export function uniquePrefix(name: string): string {
  return `idemkit-test:${slug(name, 40)}:${uniqueSuffix()}:`;
}

/** A database name of its own (`t_<name>_<hex>`, ≤ 63 chars of [a-z0-9_], valid for MongoDB and FerretDB). */
export function uniqueMongoDbName(name: string): string {
  return `t_${slug(name, 40)}_${uniqueSuffix()}`;
}

export interface IsolatedSchema {
  /** The schema's name, safe to interpolate unquoted: `t_<name>_<hex>`. */
  readonly schema: string;
  /** The given URL with `options=-c search_path=<schema>`, so unqualified tables land in the schema. */
  readonly url: string;
  /** Drops the schema and everything in it. */
  drop(): Promise<void>;
}

/** URL with the schema as search_path (libpq `options`, which pg passes in its startup message). */
export function withSearchPath(url: string, schema: string): string {
  const u = new URL(url);
  u.searchParams.set('options', `-c search_path=${schema}`);
  return u.toString();
}

async function run(url: string, sql: string): Promise<void> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    await client.query(sql);
  } finally {
    await client.end();
  }
}

/** Creates a fresh schema for one test file, so files sharing one database never see each other's tables. */
export async function isolatedPostgresSchema(url: string, name = 'test'): Promise<IsolatedSchema> {
  const schema = `t_${slug(name, 40)}_${uniqueSuffix()}`;
  await run(url, `CREATE SCHEMA ${schema}`);
  return {
    schema,
    url: withSearchPath(url, schema),
    drop: () => run(url, `DROP SCHEMA IF EXISTS ${schema} CASCADE`),
  };
}
