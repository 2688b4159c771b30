import { MongoClient } from 'mongodb';
import type { MongoClientOptions } from 'mongodb';
import { resolveMongo, uniqueMongoDbName } from '@idemkit/test-services';

/**
 * A real server for one test file: its own database (named after the file plus a random suffix,
 * so parallel files and reruns never share one), dropped afterwards. No server → the resolver
 * throws and the file fails (never skips).
 */
export async function openTestDatabase(file: string) {
  const service = await resolveMongo();
  const dbName = uniqueMongoDbName(file);
  const clients: MongoClient[] = [];
  async function client(options: MongoClientOptions = {}): Promise<MongoClient> {
    const c = new MongoClient(service.value, { serverSelectionTimeoutMS: 5_000, ...options });
    await c.connect();
    clients.push(c);
    return c;
  }
  const main = await client();
  const db = main.db(dbName);
  await db.dropDatabase();
  return {
    url: service.value,
    dbName,
    db,
    client,
    /** True on FerretDB (its buildInfo names itself), which refuses TTL indexes. */
    async isFerretDB(): Promise<boolean> {
      const info = await db.admin().command({ buildInfo: 1 });
      return 'ferretdbVersion' in info;
    },
    async close(): Promise<void> {
      try {
        await main.db(dbName).dropDatabase();
      } finally {
        await Promise.all(clients.map((c) => c.close()));
        await service.stop();
      }
    },
  };
}

export type TestDatabase = Awaited<ReturnType<typeof openTestDatabase>>;
