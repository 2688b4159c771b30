import { createMemoryStore, type StoreTransaction, type TransactionalStore } from '@idemkit/core';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { Readable } from 'node:stream';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { fastifyIdempotency } from '../src/index.js';

// Transactional mode's promise: the handler's writes and the stored answer commit (or roll back)
// together. These tests watch *when* the plugin commits, against a handler that is still writing,
// so the transaction is a recording one over the memory store (Postgres itself is covered by the
// shared HTTP suite's transactional cases): a write after the commit is refused, as pg's is.

interface Ledger {
  /** Writes that committed, in order. */
  readonly committed: string[];
  /** Transactions rolled back. */
  rolledBack: number;
}

interface Writer {
  write(note: string): void;
}

function recordingStore(ledger: Ledger): TransactionalStore<Writer> {
  const memory = createMemoryStore();
  return Object.assign(memory, {
    async beginTransaction(): Promise<StoreTransaction<Writer>> {
      const pending: string[] = [];
      let ended = false;
      return {
        client: {
          write(note: string) {
            if (ended) throw new Error('refused: the transaction has ended');
            pending.push(note);
          },
        },
        complete: (...args: Parameters<StoreTransaction<Writer>['complete']>) => {
          ended = true;
          ledger.committed.push(...pending);
          return memory.complete(...args);
        },
        rollback: async () => {
          ended = true;
          ledger.rolledBack++;
        },
      };
    },
  });
}

const apps: FastifyInstance[] = [];
afterEach(async () => {
  await Promise.all(apps.splice(0).map((app) => app.close()));
});

async function build(routes: (app: FastifyInstance) => void, leaseMs?: number): Promise<{ app: FastifyInstance; ledger: Ledger }> {
  const ledger: Ledger = { committed: [], rolledBack: 0 };
  // Closing must not wait on the connections the tests' clients abandoned.
  const app = Fastify({ forceCloseConnections: true });
  apps.push(app);
  await app.register(fastifyIdempotency, { store: recordingStore(ledger), transactional: true, logger: false, ...(leaseMs === undefined ? {} : { leaseMs }) });
  routes(app);
  await app.ready();
  return { app, ledger };
}

const tx = (request: FastifyRequest): Writer => request.idempotency?.transaction as Writer;

function post(app: FastifyInstance, key: string) {
  return app.inject({ method: 'POST', url: '/orders', payload: { sku: 'A1' }, headers: { 'idempotency-key': key } });
}

/** Two macrotask turns: past the `setImmediate` in which the plugin used to store a marker. */
const twoTurns = (): Promise<void> => new Promise((resolve) => setImmediate(() => setImmediate(resolve)));

describe('transactional mode: a hijacked reply whose client left while the handler writes', () => {
  async function hijackingApp(outcome: 'finish' | 'throw' | 'hang', leaseMs?: number): Promise<{ app: FastifyInstance; ledger: Ledger; runs: () => number; url: string }> {
    let runs = 0;
    const { app, ledger } = await build((a) =>
      a.post('/orders', async (request, reply: FastifyReply) => {
        runs++;
        reply.hijack();
        tx(request).write('step1');
        // The client leaves here; the handler goes on.
        await new Promise((resolve) => reply.raw.once('close', resolve));
        await twoTurns();
        if (outcome === 'throw') throw new Error('card declined');
        // Waits on its gone client for good (a 'drain' that never comes).
        if (outcome === 'hang') await new Promise(() => undefined);
        tx(request).write('step2');
        reply.raw.writeHead(201, { 'content-type': 'application/json' });
        reply.raw.end('{"ok":true}');
      }),
      leaseMs,
    );
    await app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = app.server.address() as { port: number };
    return { app, ledger, runs: () => runs, url: `http://127.0.0.1:${port}/orders` };
  }

  /** The client leaves once the handler has written its first step (not after a fixed time: a cold or loaded run may not have reached it). */
  async function leave(url: string, key: string, runs: () => number): Promise<void> {
    const before = runs();
    const controller = new AbortController();
    const first = fetch(url, { method: 'POST', headers: { 'idempotency-key': key, 'content-type': 'application/json' }, body: '{"sku":"A1"}', signal: controller.signal });
    await vi.waitFor(() => expect(runs()).toBe(before + 1), { timeout: 10_000, interval: 5 });
    controller.abort();
    await expect(first).rejects.toThrow();
  }

  it('the handler finishes: both writes commit together, and it is never run again', async () => {
    const { app, ledger, runs, url } = await hijackingApp('finish');
    await leave(url, 'k1', runs);
    // Before, the cut-short marker committed step1 beside the running handler, and step2 was refused.
    await vi.waitFor(() => expect(ledger.committed).toEqual(['step1', 'step2']), { timeout: 10_000 });
    const retry = await post(app, 'k1');
    expect(retry.statusCode).toBe(410);
    expect(runs()).toBe(1);
    expect(ledger.rolledBack).toBe(0);
  });

  it('the handler never ends: after a lease its transaction is rolled back and the key freed', async () => {
    const { ledger, runs, url } = await hijackingApp('hang', 300);
    await leave(url, 'k7', runs);
    // Before the bound, the key answered 409 and the connection stayed idle in transaction for good.
    await vi.waitFor(() => expect(ledger.rolledBack).toBe(1), { timeout: 3_000, interval: 20 });
    expect(ledger.committed).toEqual([]);
    await leave(url, 'k7', runs);
    expect(runs()).toBe(2);
  });

  it('the handler throws: nothing commits, the key is freed and the retry runs', async () => {
    const { ledger, runs, url } = await hijackingApp('throw');
    await leave(url, 'k2', runs);
    await vi.waitFor(() => expect(ledger.rolledBack).toBe(1), { timeout: 10_000 });
    expect(ledger.committed).toEqual([]);
    await leave(url, 'k2', runs);
    expect(runs()).toBe(2);
  });
});

describe('transactional mode: a handler that never finishes once its client left', () => {
  it('has its transaction rolled back a lease later and the key freed: the retry runs on a clean slate, not 409 for good', async () => {
    let runs = 0;
    const { app, ledger } = await build(
      (a) =>
        a.post('/orders', async (request) => {
          runs++;
          tx(request).write(`step-${runs}`);
          if (runs === 1) await new Promise(() => undefined);
          return { run: runs };
        }),
      300,
    );
    await app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = app.server.address() as { port: number };
    const controller = new AbortController();
    const first = fetch(`http://127.0.0.1:${port}/orders`, { method: 'POST', headers: { 'idempotency-key': 'hung', 'content-type': 'application/json' }, body: '{"sku":"A1"}', signal: controller.signal });
    await vi.waitFor(() => expect(runs).toBe(1), { timeout: 10_000, interval: 5 });
    controller.abort();
    await expect(first).rejects.toThrow();
    // Before, the lease was renewed while the handler hung: 409 for good, its transaction open.
    await vi.waitFor(() => expect(ledger.rolledBack).toBe(1), { timeout: 5_000, interval: 20 });
    const retry = await post(app, 'hung');
    expect(retry.statusCode).toBe(200);
    expect(retry.json()).toEqual({ run: 2 });
    expect(ledger.committed).toEqual(['step-2']);
  });
});

describe('transactional mode: a handler that finishes within a lease of its client leaving', () => {
  it('commits its writes with its answer, and the retry replays it: the lapse waits a whole lease from the leave, not only to the lease end as it stood', async () => {
    const leaseMs = 3_000;
    let runs = 0;
    let done!: () => void;
    const finished = new Promise<void>((resolve) => (done = resolve));
    const controller = new AbortController();
    const { app, ledger } = await build(
      (a) =>
        a.post('/orders', async (request) => {
          runs++;
          tx(request).write(`step-${runs}`);
          // The client leaves just before the lease's first renewal (a third of a lease after the
          // claim); the handler then needs most of a lease more, but less than one.
          await new Promise((resolve) => setTimeout(resolve, 850));
          controller.abort();
          await new Promise((resolve) => setTimeout(resolve, 0.8 * leaseMs));
          done();
          return { run: runs };
        }),
      leaseMs,
    );
    await app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = app.server.address() as { port: number };
    const first = fetch(`http://127.0.0.1:${port}/orders`, { method: 'POST', headers: { 'idempotency-key': 'late', 'content-type': 'application/json' }, body: '{"sku":"A1"}', signal: controller.signal });
    await expect(first).rejects.toThrow();
    await finished;
    await vi.waitFor(() => expect(ledger.committed.length + ledger.rolledBack).toBe(1), { timeout: 5_000, interval: 20 });
    const retry = await post(app, 'late');
    expect([retry.statusCode, retry.headers['idempotent-replayed'], retry.json()]).toEqual([200, 'true', { run: 1 }]);
    expect({ runs, committed: ledger.committed, rolledBack: ledger.rolledBack }).toEqual({ runs: 1, committed: ['step-1'], rolledBack: 0 });
  });
});

describe("transactional mode: the handler's own answer", () => {
  it.each([
    ['directly', false],
    ['with an async app-level onSend hook in between', true],
  ])('sent and returned after an await, it goes out after its commit (%s)', async (_name, asyncHook) => {
    let seenAtAnswer: string[] | undefined;
    const { app, ledger } = await build((a) => {
      if (asyncHook) {
        a.addHook('onSend', async (_request, reply, payload) => {
          reply.header('x-served-by', 'a');
          return payload;
        });
      }
      a.post(
        '/orders',
        {
          // Route-level onSend hooks run after the plugin's, as the answer is about to be written.
          onSend: (_request, _reply, payload, done) => {
            seenAtAnswer = [...ledger.committed];
            done(null, payload);
          },
        },
        async (request, reply) => {
          tx(request).write('only');
          await twoTurns();
          return reply.code(201).send({ ok: true });
        },
      );
    });
    expect((await post(app, asyncHook ? 'k8' : 'k6')).statusCode).toBe(201);
    expect(seenAtAnswer).toEqual(['only']);
  });
});

describe('transactional mode: a rolled-back answer sent as a stream', () => {
  it.each([204, 201])('the stream the rollback replaced is closed, not left open (status %i)', async (status) => {
    // A COMMIT that fails: the handler's answer is replaced by the 503.
    const store: TransactionalStore<null> = Object.assign(createMemoryStore(), {
      async beginTransaction(): Promise<StoreTransaction<null>> {
        return { client: null, complete: () => Promise.reject(new Error('COMMIT failed')), rollback: async () => undefined };
      },
    });
    const app = Fastify();
    apps.push(app);
    await app.register(fastifyIdempotency, { store, transactional: true, logger: false });
    let node: Readable | undefined;
    let cancelled = false;
    app.post('/node', async (_request, reply) => reply.code(status).send((node = new Readable({ read() {} }))));
    app.post('/web', async (_request, reply) => reply.code(status).send(new ReadableStream({ cancel: () => void (cancelled = true) })));
    await app.ready();
    for (const url of ['/node', '/web']) {
      const res = await app.inject({ method: 'POST', url, payload: {}, headers: { 'idempotency-key': `stream-${status}${url}` } });
      expect([url, res.statusCode]).toEqual([url, 503]);
    }
    // Before: never read nor closed (a file's descriptor, a cursor stayed open).
    expect(node?.destroyed).toBe(true);
    await vi.waitFor(() => expect(cancelled).toBe(true));
  });
});
