import { loadAssets } from './assets.js';
import { openBackend } from './backend.js';
import type { DemoConfig } from './config.js';
import { startExpress } from './apps/express.js';
import { startFastify } from './apps/fastify.js';
import { startKoa } from './apps/koa.js';

export interface RunningDemo {
  readonly url: string;
  close(): Promise<void>;
}

/** Start the demo with a config (tests call this; `main.ts` reads the environment). */
export async function startDemo(config: DemoConfig): Promise<RunningDemo> {
  const backend = await openBackend(config);
  const assets = loadAssets();
  const start = { fastify: startFastify, express: startExpress, koa: startKoa }[config.framework];
  const app = await start(config, backend, assets).catch(async (error: unknown) => {
    await backend.close();
    throw error;
  });
  return {
    url: app.url,
    async close() {
      await app.close();
      await backend.close();
    },
  };
}

export { readConfig, DemoConfigError, type DemoConfig } from './config.js';
