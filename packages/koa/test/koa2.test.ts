import { runHttpSuite } from '@idemkit/http-suite';
import type Koa from 'koa';
import Koa215 from 'koa-2.15';
import { createStartApp } from './app.js';
import { twinSuite } from './twin-cases.js';

// The lowest Koa of the peer range (^2.15.0 || ^3.0.0). The binding does not touch the store, so
// the memory store is enough here; test/http.test.ts runs Koa 3 against every store.
const Koa2 = Koa215 as unknown as typeof Koa;
twinSuite('koa 2.15', Koa2);
runHttpSuite({ framework: 'koa', startApp: createStartApp(Koa2), stores: ['memory'] });
