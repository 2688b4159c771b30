import { runHttpSuite } from '@idemkit/http-suite';
import { startApp } from './app.js';

// SPEC §2, the whole table, against every store over real HTTP (same suite as Express and Koa).
runHttpSuite({ framework: 'fastify', startApp });
