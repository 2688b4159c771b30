import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer as createHttpsServer } from 'node:https';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { createMemoryStore, type IdempotencyOptions } from '@idemkit/core';
import fastifyIdempotency from '@idemkit/fastify';
import Fastify, { type FastifyRequest } from 'fastify';

export interface TestServer {
  url: string;
  /** Handler executions per route. */
  runs: Map<string, number>;
  /** Requests that reached the server, answered by the handler or not (a 400 for a bad key). */
  readonly requests: number;
  /** Lets every `POST /orders?hold=1` handler go on (they wait until then), and ends `/slow-body`. */
  open(): void;
  close(): Promise<void>;
}

/**
 * A real Fastify server with @idemkit/fastify. `POST /statuses` answers the statuses listed in
 * `x-statuses` one per execution (then 201), with `x-retry-after` as Retry-After;
 * `POST /whoami` answers the Authorization and key headers it got;
 * `POST /slow-body` sends its headers and a first part, and the rest on `open()`; `POST /moved` redirects (303), `POST /moved-307` with
 * a 307 (method and body kept).
 */
export async function startServer(options: Partial<Omit<IdempotencyOptions<FastifyRequest>, 'store'>> = {}): Promise<TestServer> {
  // Connections a client left mid-answer may linger a few seconds; close() need not wait for them.
  const app = Fastify({ forceCloseConnections: true });
  const runs = new Map<string, number>();
  let open!: () => void;
  const opened = new Promise<void>((resolve) => (open = resolve));
  const count = (route: string) => {
    const n = (runs.get(route) ?? 0) + 1;
    runs.set(route, n);
    return n;
  };
  let requests = 0;
  app.addHook('onRequest', async () => void requests++);
  await app.register(fastifyIdempotency, { store: createMemoryStore(), logger: false, ...options });
  app.post('/orders', async (req, reply) => {
    const n = count('orders');
    if ((req.query as { hold?: string }).hold) await opened;
    reply.code(201);
    return { order: n, body: req.body };
  });
  app.post('/statuses', async (req, reply) => {
    const n = count('statuses');
    const statuses = String(req.headers['x-statuses'] ?? '').split(',').filter(Boolean).map(Number);
    const status = statuses[n - 1];
    if (status === undefined) return reply.code(201).send({ ok: true, run: n });
    if (req.headers['x-retry-after']) reply.header('retry-after', String(req.headers['x-retry-after']));
    return reply.code(status).send({ status });
  });
  app.get('/orders', async () => ({ runs: count('list') }));
  app.put('/things', async (req) => ({ runs: count('things'), body: req.body }));
  app.post('/referer', async (req) => ({ referer: req.headers.referer ?? null }));
  // What arrived: whether the caller's headers reached the server.
  app.post('/whoami', async (req) => ({ authorization: req.headers.authorization ?? null, key: req.headers['idempotency-key'] ?? null, run: count('whoami') }));
  // Headers at once, the rest of the body once `open()` is called (a large or slow answer).
  app.post('/slow-body', async (req, reply) => {
    count('slow-body');
    const body = new PassThrough();
    body.write('first part, ');
    void opened.then(() => body.end('last part'));
    return reply.code(201).type('text/plain').send(body);
  });
  app.post('/moved', async (_req, reply) => {
    count('moved');
    return reply.redirect('/orders', 303);
  });
  // A moved endpoint that keeps the method and body (307): not covered itself, as an alias is not.
  app.post('/moved-307', { config: { idempotency: false } }, async (_req, reply) => reply.redirect('/orders', 307));
  await app.listen({ port: 0, host: '127.0.0.1' });
  const address = app.server.address() as net.AddressInfo;
  const close = () => {
    open();
    return app.close();
  };
  return {
    url: `http://127.0.0.1:${address.port}`,
    runs,
    get requests() {
      return requests;
    },
    open,
    close,
  };
}

/**
 * A TCP proxy that loses the answer to the first `dropResponses` requests (or to those request
 * numbers, from 1, that `dropResponses` picks): the request reaches the server (which runs the
 * handler and stores the response), the client's socket is cut. Each chunk from the client counts
 * as one request (these are small), so a kept-alive connection's second request counts too.
 */
export async function startLossyProxy(
  target: string,
  dropResponses: number | ((connection: number) => boolean),
): Promise<{ url: string; connections: () => number; close(): Promise<void> }> {
  const drops = typeof dropResponses === 'number' ? (n: number) => n <= dropResponses : dropResponses;
  const { port, hostname } = new URL(target);
  let connections = 0;
  let requests = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    connections++;
    let n = 0;
    client.on('data', () => void (n = ++requests));
    const upstream = net.connect(Number(port), hostname);
    sockets.add(client).add(upstream);
    client.pipe(upstream);
    upstream.on('data', (chunk) => {
      if (drops(n)) {
        client.destroy();
        upstream.destroy();
      } else client.write(chunk);
    });
    upstream.on('end', () => client.end());
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
    client.on('close', () => sockets.delete(client));
    upstream.on('close', () => sockets.delete(upstream));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address() as net.AddressInfo;
  return {
    url: `http://127.0.0.1:${address.port}`,
    connections: () => connections,
    close: () =>
      new Promise((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** Certificates made by `openssl` for the TLS tests, as PEM text (keys included). */
export interface TestCertificates {
  /** A CA that signs `leaf` and `otherHost`; trusted by no one unless a test passes it. */
  ca: string;
  /** For 127.0.0.1 and localhost, signed by `ca`. */
  leaf: { key: string; cert: string };
  /** For other.example only, signed by `ca`: another host's certificate. */
  otherHost: { key: string; cert: string };
  /** Self-signed, for 127.0.0.1. */
  selfSigned: { key: string; cert: string };
  /** Self-signed, for 127.0.0.1, valid only on 1 January 2020. */
  expired: { key: string; cert: string };
}

/** Makes the certificates in a temporary folder with the `openssl` command (which must be installed). */
export function makeCertificates(): TestCertificates {
  const dir = mkdtempSync(join(tmpdir(), 'idemkit-client-tls-'));
  const run = (...args: string[]): void => {
    const done = spawnSync('openssl', args, { cwd: dir, encoding: 'utf8' });
    if (done.error) throw new Error(`The TLS tests need the openssl command: ${done.error.message}`);
    if (done.status !== 0) throw new Error(`openssl ${args.join(' ')} failed: ${done.stderr}`);
  };
  const read = (name: string): string => readFileSync(join(dir, name), 'utf8');
  try {
    const ip = 'subjectAltName=IP:127.0.0.1,DNS:localhost';
    run('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '2', '-subj', '/CN=idemkit test CA');
    run('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'leaf.key', '-out', 'leaf.crt', '-days', '2', '-subj', '/CN=127.0.0.1', '-addext', ip, '-CA', 'ca.crt', '-CAkey', 'ca.key');
    run('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'other.key', '-out', 'other.crt', '-days', '2', '-subj', '/CN=other.example', '-addext', 'subjectAltName=DNS:other.example', '-CA', 'ca.crt', '-CAkey', 'ca.key');
    run('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'self.key', '-out', 'self.crt', '-days', '2', '-subj', '/CN=127.0.0.1', '-addext', ip);
    // `openssl req` takes no start date: `openssl ca` signs the expired one with its own dates.
    writeFileSync(join(dir, 'index.txt'), '');
    writeFileSync(join(dir, 'serial'), '01\n');
    writeFileSync(
      join(dir, 'ca.cnf'),
      '[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\ndefault_md = sha256\npolicy = p\ncopy_extensions = copy\nunique_subject = no\n[p]\ncommonName = supplied\n',
    );
    run('req', '-new', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'expired.key', '-out', 'expired.csr', '-subj', '/CN=127.0.0.1', '-addext', ip);
    run('ca', '-batch', '-config', 'ca.cnf', '-selfsign', '-keyfile', 'expired.key', '-in', 'expired.csr', '-out', 'expired.crt', '-startdate', '20200101000000Z', '-enddate', '20200102000000Z', '-notext');
    return {
      ca: read('ca.crt'),
      leaf: { key: read('leaf.key'), cert: read('leaf.crt') },
      otherHost: { key: read('other.key'), cert: read('other.crt') },
      selfSigned: { key: read('self.key'), cert: read('self.crt') },
      expired: { key: read('expired.key'), cert: read('expired.crt') },
    };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * A real HTTPS server on 127.0.0.1 with `key` and `cert` (a chain: the leaf first), counting the
 * TCP connections and the HTTP requests it saw; it answers 201.
 */
export async function startTlsServer(key: string, cert: string): Promise<{ url: string; connections: () => number; requests: () => number; close(): Promise<void> }> {
  let connections = 0;
  let requests = 0;
  const server = createHttpsServer({ key, cert }, (_req, res) => {
    requests++;
    res.writeHead(201).end('made');
  });
  server.on('connection', () => void connections++);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `https://127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    connections: () => connections,
    requests: () => requests,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
