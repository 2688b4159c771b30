import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ordersTable, type Framework, type Library } from '../src/config.js';
import { primeReplay } from '../src/load.js';
import { ordersTableFor, type OrdersTable } from '../src/orders-table.js';
import { startServer, type RunningServer } from '../src/processes.js';

// `--handler=postgres`: the handler really writes a row per run, and a replay writes none. Real
// Postgres and real server processes (dist/server.js; `pnpm build` first).
const url = process.env['TEST_POSTGRES_URL'];
if (!url) throw new Error('TEST_POSTGRES_URL is not set: run `bash scripts/services.sh up` and source its env file');

const runId = `test${process.pid}`;
const table = ordersTable(runId);
let orders: OrdersTable;
const servers: RunningServer[] = [];
const client = new pg.Client({ connectionString: url });

beforeAll(async () => {
  orders = await ordersTableFor({ postgres: url }, table);
  await client.connect();
});

afterAll(async () => {
  await Promise.all(servers.map((s) => s.stop()));
  await client.end();
  await orders.drop();
});

async function start(library: Library, framework: Framework): Promise<RunningServer> {
  const server = await startServer({ framework, library, store: 'memory', runId: `${runId}_${framework}_${library}`, env: { postgres: url }, handler: 'postgres', ordersTable: table });
  servers.push(server);
  return server;
}

const rows = async (): Promise<number> => Number((await client.query<{ n: string }>(`SELECT count(*) AS n FROM ${table}`)).rows[0]?.n);

describe('the postgres handler', () => {
  it('a bare server inserts a row per request', async () => {
    const server = await start('bare', 'fastify');
    const before = await rows();
    for (let i = 0; i < 3; i++) expect(await primeReplay(server.url)).toBe(201);
    expect((await rows()) - before).toBe(3);
  });

  it.each(['express', 'fastify', 'koa'] as const)('behind idemkit on %s, replays of one key insert nothing more', async (framework) => {
    const server = await start('idemkit', framework);
    const before = await rows();
    for (let i = 0; i < 3; i++) expect(await primeReplay(server.url)).toBe(201);
    expect((await rows()) - before).toBe(1);
  });
});
