import { randomUUID } from 'node:crypto';
import { createMemoryStore, scopedKey } from '@idemkit/core';
import Fastify, { type FastifyInstance } from 'fastify';
import { afterEach, expect, it, vi } from 'vitest';
import { fastifyIdempotency } from '../src/index.js';

/** A promise the test resolves by hand: holds a handler open without sleeping. */
function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void;
  const promise = new Promise<void>((resolve) => {
    open = resolve;
  });
  return { promise, open };
}

let app: FastifyInstance | undefined;
afterEach(async () => {
  await app?.close();
  app = undefined;
});

async function listen(instance: FastifyInstance): Promise<string> {
  await instance.listen({ host: '127.0.0.1', port: 0 });
  const address = instance.server.address();
  if (address === null || typeof address === 'string') throw new Error('expected a TCP address');
  return `http://127.0.0.1:${address.port}`;
}

it('50 parallel requests with one key over real sockets: the handler runs once, the rest get 409 + Retry-After', async () => {
  const hold = gate();
  let runs = 0;
  app = Fastify();
  await app.register(fastifyIdempotency, { store: createMemoryStore(), logger: false });
  app.post('/pay', async (_request, reply) => {
    runs++;
    await hold.promise;
    return reply.code(201).send({ paid: randomUUID() });
  });
  const url = await listen(app);

  let settled = 0;
  const key = randomUUID();
  const responses = Array.from({ length: 50 }, () =>
    fetch(`${url}/pay`, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': key }, body: '{"amount":5}' })
      .then(async (res) => ({ status: res.status, retryAfter: res.headers.get('retry-after'), body: await res.text() }))
      .finally(() => settled++),
  );
  // Every duplicate is answered while the first still holds the lease; then let the first finish.
  await vi.waitFor(() => expect(settled).toBe(49), { timeout: 15_000, interval: 10 });
  hold.open();
  const all = await Promise.all(responses);

  expect(runs).toBe(1);
  const created = all.filter((r) => r.status === 201);
  const conflicts = all.filter((r) => r.status === 409);
  expect(created).toHaveLength(1);
  expect(conflicts).toHaveLength(49);
  for (const c of conflicts) expect(Number(c.retryAfter)).toBeGreaterThanOrEqual(1);

  const replay = await fetch(`${url}/pay`, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': key }, body: '{"amount":5}' });
  expect(replay.headers.get('idempotent-replayed')).toBe('true');
  expect(await replay.text()).toBe(created[0]?.body);
  expect(runs).toBe(1);
});

it("a client that disconnects while the handler runs does not free the key: the handler's answer is stored and the retry replays it", async () => {
  const hold = gate();
  const started = gate();
  let runs = 0;
  let aborted = false;
  const store = createMemoryStore();
  app = Fastify();
  await app.register(fastifyIdempotency, { store, logger: false });
  app.post('/pay', async (_request, reply) => {
    runs++;
    // The server sees the client go: the response closes before it was ended.
    reply.raw.once('close', () => {
      if (!reply.raw.writableEnded) aborted = true;
    });
    started.open();
    await hold.promise;
    return reply.code(201).send({ paid: runs });
  });
  const url = await listen(app);
  const key = randomUUID();
  const send = (signal?: AbortSignal) =>
    fetch(`${url}/pay`, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': key }, body: '{}', signal: signal ?? null });

  const controller = new AbortController();
  const first = send(controller.signal).catch((error: unknown) => error);
  await started.promise;
  controller.abort();
  expect(await first).toBeInstanceOf(Error);
  await vi.waitFor(() => expect(aborted).toBe(true), { timeout: 5_000, interval: 10 });

  // Still running: a retry now is told to wait, not run a second time.
  expect((await send()).status).toBe(409);

  hold.open();
  await vi.waitFor(async () => expect((await store.get(scopedKey(undefined, key)))?.state).toBe('completed'), { timeout: 5_000, interval: 10 });
  const retry = await send();
  expect(retry.status).toBe(201);
  expect(retry.headers.get('idempotent-replayed')).toBe('true');
  expect(await retry.json()).toEqual({ paid: 1 });
  expect(runs).toBe(1);
});
