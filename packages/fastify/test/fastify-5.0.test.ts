import { runHttpSuite } from '@idemkit/http-suite';
import type Fastify from 'fastify';
import Fastify50 from 'fastify-5.0';
import { createStartApp } from './app.js';
import { twinSuite } from './twin.js';

// The lowest Fastify of the peer range (^5.0.0). The plugin does not touch the store, so the
// memory store is enough here; test/http.test.ts runs the current Fastify against every store.
const Fastify5 = Fastify50 as unknown as typeof Fastify;
twinSuite('fastify 5.0.0', Fastify5);
runHttpSuite({ framework: 'fastify', startApp: createStartApp(Fastify5), stores: ['memory'] });
