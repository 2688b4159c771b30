import Fastify from 'fastify';
import { twinSuite } from './twin.js';

twinSuite('fastify 5 (current)', Fastify);
