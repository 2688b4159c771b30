import { createServer, type RequestListener, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { DemoConfig } from '../config.js';
import type { RunningDemo } from '../server.js';

/** How long close() lets requests in flight finish before it drops their connections. */
export const SHUTDOWN_GRACE_MS = 10_000;

/**
 * Close a server gracefully: `close` stops accepting connections; the requests in flight finish
 * (a payment that started gets its answer, and its response is stored, instead of a reset
 * connection and a key locked for the lease); each keep-alive socket is dropped as soon as it is
 * idle, since a browser keeps it open (Node for 5 s, Fastify for 72 s) and server.close() waits
 * for it; after SHUTDOWN_GRACE_MS the remaining connections are dropped too.
 */
export async function closeGracefully(server: Server, close: () => Promise<void>): Promise<void> {
  const idle = setInterval(() => server.closeIdleConnections(), 50);
  const force = setTimeout(() => server.closeAllConnections(), SHUTDOWN_GRACE_MS);
  try {
    const closed = close();
    server.closeIdleConnections();
    await closed;
  } finally {
    clearInterval(idle);
    clearTimeout(force);
  }
}

/** The demo's URL; an IPv6 host goes in brackets (http://[::1]:3000). */
export const urlOf = (host: string, port: number): string => `http://${host.includes(':') ? `[${host}]` : host}:${port}`;

/** Serve an Express app or a Koa callback on the configured address. */
export async function listen(handler: RequestListener, config: DemoConfig): Promise<RunningDemo> {
  const server = createServer(handler);
  server.listen(config.port, config.host);
  await new Promise<void>((resolve, reject) => server.once('listening', resolve).once('error', reject));
  const { port } = server.address() as AddressInfo;
  return {
    url: urlOf(config.host, port),
    close: () => closeGracefully(server, () => new Promise<void>((resolve) => server.close(() => resolve()))),
  };
}
