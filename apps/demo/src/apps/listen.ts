import { createServer, type RequestListener } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { DemoConfig } from '../config.js';
import type { RunningDemo } from '../server.js';

/** Serve an Express app or a Koa callback on the configured address; close() drops keep-alive sockets too. */
export async function listen(handler: RequestListener, config: DemoConfig): Promise<RunningDemo> {
  const server = createServer(handler);
  server.listen(config.port, config.host);
  await new Promise<void>((resolve, reject) => server.once('listening', resolve).once('error', reject));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://${config.host}:${port}`,
    close: () => new Promise<void>((resolve) => { server.closeAllConnections(); server.close(() => resolve()); }),
  };
}
