// One benchmarked server per process (the load generator runs in another one): framework +
// library + store from the JSON in BENCH_SERVER. Prints `READY <port>` once it listens on
// 127.0.0.1; on SIGTERM closes, removes what it stored and exits 0 (so --cpu-prof is written).
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { createOrder, createOrderInPostgres, type AppContext, type Counters, type LibrarySetup, type Order } from './apps/context.js';
import { BENCH_TTL_MS, type ServerSpec } from './config.js';
import { openStore } from './stores.js';
// Frameworks and peers load on demand: a server holds only its own code (cleaner profiles).

const spec = JSON.parse(process.env['BENCH_SERVER'] ?? 'null') as ServerSpec | null;
if (!spec) throw new Error('BENCH_SERVER (JSON) is not set: start this through the bench runner');

let library: LibrarySetup = { kind: 'bare' };
let roundTrips = (): number => 0;
let closeLibrary = async (): Promise<void> => undefined;
switch (spec.library) {
  case 'idemkit': {
    const counted = await openStore(spec.store, spec.env, spec.runId);
    // A shortened lease (the crash check) gets a store deadline well inside it, as core asks.
    const storeTimeoutMs = spec.leaseMs === undefined ? undefined : Math.ceil(spec.leaseMs / 4);
    library = { kind: 'idemkit', store: counted.store, ttlMs: BENCH_TTL_MS, leaseMs: spec.leaseMs, storeTimeoutMs, localCache: spec.localCache === true };
    roundTrips = counted.roundTrips;
    closeLibrary = counted.close;
    break;
  }
  case 'node-idempotency': {
    const { nodeIdempotency } = await import('./peers/node-idempotency.js');
    const setup = await nodeIdempotency(spec.store, spec.env, spec.runId);
    library = { kind: 'node-idempotency', idempotency: setup.idempotency };
    roundTrips = setup.roundTrips;
    closeLibrary = setup.close;
    break;
  }
  case 'express-idempotency':
    library = { kind: 'express-idempotency' };
    break;
  case 'probe-hook':
    library = { kind: 'probe-hook' };
    break;
  case 'probe-store': {
    const { AnswerKeeper } = await import('./apps/probes.js');
    library = { kind: 'probe-store', keeper: new AnswerKeeper() };
    break;
  }
  case 'bare':
    break;
}

const counters: Counters = { requests: 0, runs: 0, slowRuns: 0, crashRuns: 0 };
const cpuMicros = (): number => {
  const { user, system } = process.cpuUsage();
  return user + system;
};
let order = (body: unknown): Order | Promise<Order> => createOrder(counters, body);
let closeHandler = async (): Promise<void> => undefined;
if (spec.handler === 'postgres') {
  if (!spec.env.postgres) throw new Error('the postgres handler needs TEST_POSTGRES_URL');
  const { default: pg } = await import('pg');
  // As many connections as load connections, so the handler never queues for one.
  const pool = new pg.Pool({ connectionString: spec.env.postgres, max: 10 });
  const table = spec.ordersTable;
  order = (body) => createOrderInPostgres((text, values) => pool.query<{ id: string }>(text, values), table, counters, body);
  closeHandler = () => pool.end();
}
let inFlight = 0;
const context: AppContext = { library, counters, order, stats: () => ({ ...counters, roundTrips: roundTrips(), inFlight, cpuMicros: cpuMicros(), kept: library.kind === 'probe-store' ? library.keeper.size : 0 }) };

let server: Server;
let closeApp = async (): Promise<void> => undefined;
switch (spec.framework) {
  case 'express': {
    const { expressApp } = await import('./apps/express-app.js');
    server = createServer(expressApp(context));
    break;
  }
  case 'koa': {
    const { koaApp } = await import('./apps/koa-app.js');
    server = createServer(koaApp(context).callback());
    break;
  }
  case 'fastify': {
    const { fastifyApp } = await import('./apps/fastify-app.js');
    const app = await fastifyApp(context);
    await app.ready();
    server = app.server;
    closeApp = () => app.close();
    break;
  }
}
server.keepAliveTimeout = 30_000;
// Lets the runner wait for requests cut off at the end of a run to settle before it reads counters.
server.on('request', (req: IncomingMessage, res: ServerResponse) => {
  if (req.method !== 'POST') return;
  inFlight++;
  res.once('close', () => inFlight--);
});
await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
process.stdout.write(`READY ${(server.address() as AddressInfo).port}\n`);

let stopping = false;
async function stop(): Promise<void> {
  if (stopping) return;
  stopping = true;
  server.closeAllConnections();
  await Promise.race([
    (async () => {
      if (spec?.framework === 'fastify') await closeApp();
      else await new Promise((resolve) => server.close(resolve));
      await closeLibrary();
      await closeHandler();
    })(),
    new Promise((resolve) => setTimeout(resolve, 10_000).unref()),
  ]);
  process.exit(0);
}
process.on('SIGTERM', () => void stop());
process.on('SIGINT', () => void stop());
