import { createServer, connect as connectTcp, type AddressInfo, type Socket } from 'node:net';
import { Cluster, Redis } from 'ioredis';
import { afterAll, describe, expect, it } from 'vitest';
import { createRedisStore } from '../src/index.js';
import { clientKeyPrefix, uploadKey } from '../src/redis-store.js';
import { COMPLETE_STAGED, STAGE } from '../src/scripts.js';
import { clusterService, deleteByPrefix, redisService, uniquePrefix } from './services.js';

const service = await redisService();
const cluster = await clusterService();
const open: Array<Redis | Cluster> = [];
afterAll(async () => {
  for (const client of open) client.disconnect();
  await service.stop();
  await cluster.service.stop();
});

/** Every byte value, `bytes` long. */
function bodyOf(bytes: number): Buffer {
  const body = Buffer.alloc(bytes);
  for (let i = 0; i < body.length; i++) body[i] = (i * 131 + (i >> 8)) & 0xff;
  return body;
}

/**
 * A TCP hop to the shared Redis that carries what the client sends at ~`rate` bytes/s (a slow
 * uplink); answers come back at full speed.
 */
async function slowUplink(target: URL, rate: number): Promise<{ port: number; close: () => Promise<void> }> {
  const sockets = new Set<Socket>();
  const server = createServer((down) => {
    const up = connectTcp(Number(target.port || 6379), target.hostname);
    for (const s of [down, up]) {
      sockets.add(s);
      s.on('error', () => undefined);
      s.on('close', () => sockets.delete(s));
    }
    up.pipe(down);
    const queue: Buffer[] = [];
    let busy = false;
    const pump = (): void => {
      const chunk = busy ? undefined : queue.shift();
      if (chunk === undefined) return;
      busy = true;
      up.write(chunk);
      setTimeout(() => {
        busy = false;
        pump();
      }, (chunk.length / rate) * 1000);
    };
    down.on('data', (data: Buffer) => {
      for (let at = 0; at < data.length; at += 16_384) queue.push(data.subarray(at, at + 16_384));
      pump();
    });
    down.on('close', () => up.destroy());
    up.on('close', () => down.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

describe('a body that takes longer than socketTimeout to upload', () => {
  it('is stored and replayed, and the connection is never dropped (the body goes in chunks, each answered)', async () => {
    const hop = await slowUplink(new URL(service.value), 1_000_000);
    const client = new Redis({ host: '127.0.0.1', port: hop.port, socketTimeout: 1_000 });
    open.push(client);
    const dropped: string[] = [];
    client.on('error', (error: Error) => dropped.push(error.message));
    const prefix = uniquePrefix('redis_big_upload');
    const store = createRedisStore({ client, prefix });
    const direct = new Redis(service.value);
    open.push(direct);
    try {
      // 'k}': no hash tag and a `}`, so no upload key could share its Cluster slot; a single node has none.
      for (const key of ['k', 'k}']) {
        const begun = await store.begin(key, 'fp', 60_000);
        if (begun.kind !== 'acquired') throw new Error('not acquired');
        // ~3 s of upload at 1 MB/s, three times the socket timeout. Sent as one command, it was
        // dropped at every timeout and re-sent for good: this call never settled.
        const body = bodyOf(3 * 1024 * 1024);
        const outcome = await Promise.race([
          store.complete(key, begun.token, { status: 201, headers: [['content-type', 'application/octet-stream']], body }, 60_000),
          new Promise<string>((resolve) => setTimeout(() => resolve(`still not stored; connection dropped ${dropped.length} times`), 25_000).unref()),
        ]);
        expect(outcome, key).toBe(true);
        expect(dropped, key).toEqual([]);
        const replay = await store.begin(key, 'fp', 60_000);
        expect(replay.kind, key).toBe('existing');
        if (replay.kind !== 'existing') return;
        expect(replay.record.response?.status).toBe(201);
        expect(Buffer.from(replay.record.response?.body ?? new Uint8Array()).equals(body), key).toBe(true);
        // The upload key went with the completion: only the record is left under the prefix.
        expect(await direct.keys(`${prefix}*`), key).toEqual([`${prefix}${key}`]);
        await deleteByPrefix(direct, prefix);
      }
    } finally {
      client.disconnect();
      await hop.close();
    }
  }, 60_000);
});

describe('an upload with a chunk missing', () => {
  // The store's own scripts, sent one by one, so that a chunk can be left out as a refused write
  // (no memory), an eviction or a lost redirection would: before, the chunk after the gap was
  // written past it, the length check passed, and the record was stored with zeros in place of
  // the lost chunk and replayed so for its whole TTL.
  const CHUNK = 256 * 1024;
  const body = bodyOf(3 * CHUNK);
  const chunk = (n: number): Buffer => body.subarray(n * CHUNK, (n + 1) * CHUNK);

  /** A store with key 'k' claimed, and an upload key for it. */
  async function claimed(name: string) {
    const client = new Redis(service.value);
    open.push(client);
    const prefix = uniquePrefix(name);
    const store = createRedisStore({ client, prefix });
    const begun = await store.begin('k', 'fp', 60_000);
    if (begun.kind !== 'acquired') throw new Error('not acquired');
    const upload = uploadKey(false, '', prefix, 'k');
    if (upload === null) throw new Error('no upload key');
    return { client, prefix, store, token: begun.token, upload };
  }

  it('is never completed: the chunk after the gap and the completion are refused, and the claim stays', async () => {
    const { client, prefix, store, token, upload } = await claimed('redis_upload_gap');

    expect(await client.eval(STAGE, 1, upload, 0, chunk(0), 60_000)).toBe(1);
    await expect(client.eval(STAGE, 1, upload, 2 * CHUNK, chunk(2), 60_000)).rejects.toThrow(/chunk of the uploaded body before this one is missing/);
    await expect(client.eval(COMPLETE_STAGED, 2, prefix + 'k', upload, token, 60_000, 200, '[]', body.byteLength)).rejects.toThrow(/uploaded body is incomplete/);
    expect((await store.get('k'))?.state).toBe('in_progress');

    // The claim still holds, so the next attempt stores the whole body.
    expect(await store.complete('k', token, { status: 200, headers: [], body }, 60_000)).toBe(true);
    const stored = await store.get('k');
    expect(Buffer.from(stored?.response?.body ?? new Uint8Array()).equals(body)).toBe(true);
    await deleteByPrefix(client, prefix);
  });

  it('takes a chunk sent twice (re-sent after a reconnect) once, and completes', async () => {
    const { client, prefix, store, token, upload } = await claimed('redis_upload_resent');
    for (const n of [0, 1, 1, 2, 2]) expect(await client.eval(STAGE, 1, upload, n * CHUNK, chunk(n), 60_000)).toBe(1);
    expect(await client.eval(COMPLETE_STAGED, 2, prefix + 'k', upload, token, 60_000, 200, '[]', body.byteLength)).toBe(1);
    // The completion itself re-sent (its reply lost), its chunks answered before: the first send
    // took the upload, so the body's length stands in for it. Another length or status is refused.
    expect(await client.exists(upload)).toBe(0);
    expect(await client.eval(COMPLETE_STAGED, 2, prefix + 'k', upload, token, 60_000, 200, '[]', body.byteLength)).toBe(1);
    expect(await client.eval(COMPLETE_STAGED, 2, prefix + 'k', upload, token, 60_000, 200, '[]', body.byteLength - 1)).toBe(0);
    expect(await client.eval(COMPLETE_STAGED, 2, prefix + 'k', upload, token, 60_000, 410, '[]', body.byteLength)).toBe(0);
    const stored = await store.get('k');
    expect(stored?.state).toBe('completed');
    expect(Buffer.from(stored?.response?.body ?? new Uint8Array()).equals(body)).toBe(true);
    await deleteByPrefix(client, prefix);
  });
});

describe('chunked completion on a Cluster', () => {
  it('stores large bodies whatever hash tags the key, the prefix or ioredis keyPrefix hold, and leaves no upload key', async () => {
    const base = uniquePrefix('redis_big_cluster');
    const plain = await cluster.connect();
    open.push(plain);
    const body = bodyOf(700 * 1024); // three chunks
    const cases: Array<{ keyPrefix?: string | Buffer; prefix: string; key: string }> = [
      { prefix: `${base}:`, key: 'plain' },
      { prefix: `${base}:`, key: 'tagged{order-1}' },
      { prefix: `${base}:`, key: 'open{only' },
      { prefix: `${base}:`, key: 'close}only' }, // no upload key in its slot: one command, as before
      { prefix: `${base}:`, key: 'empty{}tag' },
      { prefix: `${base}:{t}:`, key: 'tag-in-prefix' },
      { keyPrefix: `${base}:kp:`, prefix: 'p:', key: 'with-keyPrefix' },
      { keyPrefix: `${base}:{kp}:`, prefix: 'p:', key: 'tagged-keyPrefix' },
      // ioredis sends a Buffer keyPrefix byte for byte. Before, it was read as no prefix: the upload
      // key's tag left it out, and the completion failed with CROSSSLOT.
      { keyPrefix: Buffer.from(`${base}:bkp:`), prefix: 'p:', key: 'buffer-keyPrefix' },
    ];
    for (const { keyPrefix, prefix, key } of cases) {
      const nodes = (cluster.service.value as Array<{ host: string; port: number }>).map(({ host, port }) => ({ host, port }));
      // ioredis types keyPrefix as a string but takes a Buffer too (its Command.js), as JS users do.
      const client = keyPrefix === undefined ? plain : new Cluster(nodes, { keyPrefix: keyPrefix as string });
      if (client !== plain) open.push(client);
      const store = createRedisStore({ client, prefix });
      const begun = await store.begin(key, 'fp', 60_000);
      if (begun.kind !== 'acquired') throw new Error(`${key}: not acquired`);
      expect(await store.complete(key, begun.token, { status: 200, headers: [], body }, 60_000), key).toBe(true);
      const replay = await store.begin(key, 'fp', 60_000);
      expect(replay.kind, key).toBe('existing');
      if (replay.kind === 'existing') expect(Buffer.from(replay.record.response?.body ?? new Uint8Array()).equals(body), key).toBe(true);
      // Wherever the upload key went, it is gone: the record alone is left.
      const left: Buffer[] = [];
      for (const node of plain.nodes('master')) left.push(...(await node.keysBuffer(`${base}*`)));
      expect(left, key).toEqual([Buffer.concat([Buffer.from(keyPrefix ?? ''), Buffer.from(`${prefix}${key}`)])]);
      await deleteByPrefix(plain, base);
    }
  }, 60_000);

  it('puts an upload key in the record\'s slot, or none', () => {
    expect(uploadKey(true, '', 'p:', 'a')).toMatch(/^p:\{p:a\}:upload:/);
    expect(uploadKey(true, '', 'p:', 'x{t}y')).toMatch(/^p:x\{t\}y:upload:/);
    expect(uploadKey(true, '', 'p:', 'x}y')).toBeNull();
    expect(uploadKey(true, '', 'p{', 'a')).toBeNull();
    expect(uploadKey(true, 'k{', 'p:', 'a')).toBeNull();
    expect(uploadKey(true, null, 'p:', 'a')).toBeNull();
    expect(uploadKey(false, null, 'p:', 'a')).toMatch(/^p:a:upload:/);
    expect(clientKeyPrefix({ options: { keyPrefix: Buffer.from('é:') } } as never)).toBe('é:');
    // Bytes that are not UTF-8 (ioredis 5.11 itself sends SET with them malformed): no string can
    // repeat them in a tag, so no upload key.
    expect(clientKeyPrefix({ options: { keyPrefix: Buffer.from([0xff]) } } as never)).toBeNull();
    expect(clientKeyPrefix({ options: {} } as never)).toBe('');
    // A single node has no slots: every key gets an upload key.
    expect(uploadKey(false, '', 'p:', 'x}y')).toMatch(/^p:x\}y:upload:/);
  });
});
