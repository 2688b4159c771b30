import { MongoClient } from 'mongodb';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { resolveMongo, uniqueMongoDbName, type ResolvedService } from '../src/index.js';

describe('MongoDB wire protocol through the resolver (real server)', () => {
  let svc: ResolvedService<string>;
  let client: MongoClient;
  const dbName = uniqueMongoDbName('mongo smoke');

  beforeAll(async () => {
    svc = await resolveMongo();
    client = new MongoClient(svc.value, { serverSelectionTimeoutMS: 5_000 });
    await client.connect();
  });
  afterAll(async () => {
    await client?.db(dbName).dropDatabase();
    await client?.close();
    await svc?.stop();
  });

  it('writes and reads a document in its own database', async () => {
    const coll = client.db(dbName).collection<{ _id: string; n: number }>('items');
    await coll.insertOne({ _id: 'a', n: 1 });
    expect(await coll.findOne({ _id: 'a' })).toEqual({ _id: 'a', n: 1 });
  });

  it('rejects a duplicate _id, as the stores rely on', async () => {
    const coll = client.db(dbName).collection<{ _id: string }>('dups');
    await coll.insertOne({ _id: 'x' });
    await expect(coll.insertOne({ _id: 'x' })).rejects.toMatchObject({ code: 11000 });
  });
});
