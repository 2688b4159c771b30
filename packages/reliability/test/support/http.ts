import { connect } from 'node:net';

export interface Answer {
  readonly status: number;
  readonly headers: Headers;
  readonly text: string;
  readonly ms: number;
}

/** POST JSON with an optional key; resolves with the whole answer and how long it took. */
export async function post(
  url: string,
  body: unknown,
  headers: Record<string, string> = {},
  timeoutMs = 30_000,
): Promise<Answer> {
  const started = Date.now();
  const res = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
    signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await res.text();
  return { status: res.status, headers: res.headers, text, ms: Date.now() - started };
}

export interface RawAnswer {
  readonly status: number;
  readonly head: string;
  readonly body: string;
}

/**
 * Send bytes fetch would refuse (duplicate or non-UTF-8 header lines, control characters) over a
 * plain socket, with `Connection: close`, and read the whole answer.
 */
export function rawRequest(port: number, head: Buffer | string, body: Buffer | string = '', timeoutMs = 10_000): Promise<RawAnswer> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no answer within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.on('data', (c) => chunks.push(c));
    socket.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    socket.on('close', () => {
      clearTimeout(timer);
      const all = Buffer.concat(chunks).toString('latin1');
      const split = all.indexOf('\r\n\r\n');
      const headPart = split === -1 ? all : all.slice(0, split);
      const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(headPart)?.[1] ?? 0);
      resolve({ status, head: headPart, body: split === -1 ? '' : all.slice(split + 4) });
    });
    socket.write(Buffer.concat([typeof head === 'string' ? Buffer.from(head, 'latin1') : head, Buffer.from(body)]));
  });
}

/** A request head with the given extra header lines (raw bytes allowed), for rawRequest. */
export function postHead(path: string, headerLines: Array<Buffer | string>, bodyLength: number): Buffer {
  const parts: Buffer[] = [
    Buffer.from(`POST ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: ${bodyLength}\r\n`),
  ];
  for (const l of headerLines) parts.push(typeof l === 'string' ? Buffer.from(l, 'latin1') : l, Buffer.from('\r\n'));
  parts.push(Buffer.from('\r\n'));
  return Buffer.concat(parts);
}
