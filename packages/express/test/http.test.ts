import { runHttpSuite } from '@idemkit/http-suite';
import { startApp } from './app.js';

runHttpSuite({ framework: 'express', startApp });
