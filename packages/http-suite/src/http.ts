import { connect } from 'node:net';

/** A response read to the end: status, headers and the exact body bytes. */
export interface Reply {
  readonly status: number;
  readonly headers: Headers;
  readonly body: Uint8Array;
  readonly replayed: boolean;
  text(): string;
  json(): unknown;
}

export interface SendOptions {
  readonly method?: string;
  /** Sent as `Idempotency-Key` when defined. */
  readonly key?: string;
  /** Sent as JSON (content-type application/json). */
  readonly json?: unknown;
  /** Sent as text/plain. */
  readonly text?: string;
  /** `x-user`, the test app's scope. */
  readonly user?: string;
  readonly headers?: Readonly<Record<string, string>>;
}

/** One real HTTP request with fetch, body read to the end. */
export async function send(baseUrl: string, path: string, options: SendOptions = {}): Promise<Reply> {
  const headers = new Headers(options.headers);
  let body: string | undefined;
  if (options.json !== undefined) {
    headers.set('content-type', 'application/json');
    body = JSON.stringify(options.json);
  } else if (options.text !== undefined) {
    headers.set('content-type', 'text/plain; charset=utf-8');
    body = options.text;
  }
  if (options.key !== undefined) headers.set('idempotency-key', options.key);
  if (options.user !== undefined) headers.set('x-user', options.user);
  const res = await fetch(baseUrl + path, { method: options.method ?? 'POST', headers, body });
  const bytes = new Uint8Array(await res.arrayBuffer());
  return {
    status: res.status,
    headers: res.headers,
    body: bytes,
    replayed: res.headers.get('idempotent-replayed') === 'true',
    text: () => new TextDecoder().decode(bytes),
    json: () => JSON.parse(new TextDecoder().decode(bytes)) as unknown,
  };
}

export interface RawReply {
  readonly status: number;
  /** Everything after the status line (headers and body, as latin1 text). */
  readonly rest: string;
}

/**
 * A request written byte for byte on a socket, for what fetch cannot send: raw non-ASCII header
 * bytes and several `Idempotency-Key` header lines (fetch joins repeated headers into one).
 */
export function rawRequest(baseUrl: string, path: string, extraHeaders: readonly Buffer[], json: unknown = {}): Promise<RawReply> {
  const url = new URL(baseUrl);
  const body = Buffer.from(JSON.stringify(json));
  const head = Buffer.from(
    `POST ${path} HTTP/1.1\r\nHost: ${url.host}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n`,
    'latin1',
  );
  const lines = extraHeaders.flatMap((h) => [h, Buffer.from('\r\n')]);
  const payload = Buffer.concat([head, ...lines, Buffer.from('\r\n'), body]);
  return new Promise((resolve, reject) => {
    const socket = connect({ host: url.hostname, port: Number(url.port) });
    const chunks: Buffer[] = [];
    socket.on('connect', () => socket.end(payload));
    socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    socket.on('error', reject);
    socket.on('close', () => {
      const text = Buffer.concat(chunks).toString('latin1');
      const match = /^HTTP\/1\.1 (\d{3})/.exec(text);
      if (!match?.[1]) {
        reject(new Error(`no HTTP status line in raw reply: ${JSON.stringify(text.slice(0, 200))}`));
        return;
      }
      resolve({ status: Number(match[1]), rest: text.slice(text.indexOf('\r\n') + 2) });
    });
  });
}

/** The `Idempotency-Key` header line with these exact bytes as its value. */
export function keyHeaderBytes(value: Buffer): Buffer {
  return Buffer.concat([Buffer.from('Idempotency-Key: '), value]);
}
