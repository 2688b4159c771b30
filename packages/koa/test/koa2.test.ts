import { runHttpSuite } from '@idemkit/http-suite';
import { describe } from 'vitest';
import type Koa from 'koa';
import Koa215 from 'koa-2.15';
import Koa216 from 'koa-2.16';
import { createStartApp } from './app.js';
import { twinSuite } from './twin-cases.js';

// Koa 2: the lowest of the peer range (^2.15.0 || ^3.0.0) and the last 2.x line, which most Koa 2
// apps run. The binding does not touch the store, so the memory store is enough here;
// test/http.test.ts runs Koa 3 against every store.
for (const [label, KoaClass] of [['koa 2.15', Koa215], ['koa 2.16', Koa216]] as const) {
  const Koa2 = KoaClass as unknown as typeof Koa;
  twinSuite(label, Koa2);
  describe(label, () => runHttpSuite({ framework: 'koa', startApp: createStartApp(Koa2), stores: ['memory'] }));
}
