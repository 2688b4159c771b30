import { runHttpSuite } from '@idemkit/http-suite';
import { startApp } from './app.js';

// SPEC §2 against every store (memory, postgres, redis, redis cluster, mongodb) over real HTTP.
runHttpSuite({ framework: 'koa', startApp });
