import { createMemoryStore } from '@idemkit/core';
import { runStoreConformance } from '../src/index.js';

// The in-memory store is the suite's own self-test: it must pass every clause.
runStoreConformance({
  name: 'memory',
  createStore: () => createMemoryStore(),
});
