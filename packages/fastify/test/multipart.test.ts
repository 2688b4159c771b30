import fastifyMultipart from '@fastify/multipart';
import { createMemoryStore } from '@idemkit/core';
import Fastify, { type FastifyInstance } from 'fastify';
import { afterEach, describe, expect, it } from 'vitest';
import { fastifyIdempotency } from '../src/index.js';

// Uploads: the file bytes are part of the request, so a different file under the same key must
// be a 422, never the first upload's answer.

const apps: FastifyInstance[] = [];
afterEach(async () => {
  await Promise.all(apps.splice(0).map((app) => app.close()));
});

const multipart = (content: string): string =>
  '--X\r\nContent-Disposition: form-data; name="amount"\r\n\r\n10\r\n' +
  `--X\r\nContent-Disposition: form-data; name="doc"; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n${content}\r\n--X--\r\n`;

async function uploadApp(attachFieldsToBody: 'keyValues' | true | undefined, required = true): Promise<{ app: FastifyInstance; runs: () => number }> {
  let runs = 0;
  const app = Fastify();
  apps.push(app);
  await app.register(fastifyMultipart, attachFieldsToBody === undefined ? {} : { attachFieldsToBody });
  await app.register(fastifyIdempotency, { store: createMemoryStore(), logger: false, required });
  app.post('/upload', async (_request, reply) => {
    runs++;
    return reply.code(201).send({ run: runs });
  });
  await app.ready();
  return { app, runs: () => runs };
}

function upload(app: FastifyInstance, content: string, key: string | null = 'invoice-1') {
  return app.inject({
    method: 'POST',
    url: '/upload',
    headers: { ...(key === null ? {} : { 'idempotency-key': key }), 'content-type': 'multipart/form-data; boundary=X' },
    payload: multipart(content),
  });
}

describe('uploads through @fastify/multipart', () => {
  it.each(['keyValues', true] as const)('with attachFieldsToBody: %s, the file is in the body, so another file under the same key is a 422', async (mode) => {
    // `true` gives parts that refer back to the whole body: before, every keyed upload was a 500.
    const { app, runs } = await uploadApp(mode);
    expect((await upload(app, 'invoice for ALICE')).statusCode).toBe(201);
    expect((await upload(app, 'invoice for BOB')).statusCode).toBe(422);
    const again = await upload(app, 'invoice for ALICE');
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect(runs()).toBe(1);
  });

  it('without it, the files are not in the body: refused with a message naming the fix, never run', async () => {
    const { app, runs } = await uploadApp(undefined);
    const res = await upload(app, 'invoice for ALICE');
    // Before, the fingerprint saw no body: BOB's upload under the same key got ALICE's answer.
    expect(res.statusCode).toBe(500);
    expect(res.json()).toMatchObject({ code: 'ERR_IDEMKIT_BODY_NOT_PARSED' });
    expect(res.json().message).toContain("attachFieldsToBody: 'keyValues'");
    expect(runs()).toBe(0);
  });

  it('a keyless upload is not refused for it: through with required: false, 400 for the missing key otherwise', async () => {
    const optional = await uploadApp(undefined, false);
    expect((await upload(optional.app, 'invoice for ALICE', null)).statusCode).toBe(201);
    const required = await uploadApp(undefined, true);
    expect((await upload(required.app, 'invoice for ALICE', null)).statusCode).toBe(400);
  });

  it("with 'keyValues', a client's JSON field shaped like a part is a field like any other (never a 500, never a false replay)", async () => {
    const { app, runs } = await uploadApp('keyValues');
    const withField = (json: string) =>
      app.inject({
        method: 'POST',
        url: '/upload',
        headers: { 'idempotency-key': 'json-part', 'content-type': 'multipart/form-data; boundary=X' },
        payload: `--X\r\nContent-Disposition: form-data; name="amount"\r\nContent-Type: application/json\r\n\r\n${json}\r\n--X--\r\n`,
      });
    expect((await withField('{"type":"file","fieldname":"a"}')).statusCode).toBe(201);
    // Before, both were read as parts: the first a 500, this one the value "100" (a replay of another body).
    expect((await withField('{"type":"field","fieldname":"a","value":"100"}')).statusCode).toBe(422);
    expect(runs()).toBe(1);
  });
});
