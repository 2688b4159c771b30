import type Koa from 'koa';
import { expectReadmePayments, importReadmeQuickStart } from '@idemkit/http-suite';
import { it } from 'vitest';
import { listen } from './app.js';

/** Runs the README's quick start as written (see importReadmeQuickStart) against a real socket. */
it('README quick start runs as written: one charge, byte-identical replay, 422 on a changed body', async () => {
  const { app, cleanup } = await importReadmeQuickStart<Koa>(new URL('../', import.meta.url), '@idemkit/koa');
  app.silent = true;
  const server = await listen(app);
  try {
    await expectReadmePayments(server.url);
  } finally {
    await server.close();
    cleanup();
  }
});
