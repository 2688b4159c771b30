// test/conformance.test.ts
import { createMemoryStore } from '@idemkit/core'; // ← your store's factory instead
import { runStoreConformance } from '@idemkit/store-conformance';

runStoreConformance({
  name: 'memory',
  // Called once per clause; may share one client.
  createStore: () => createMemoryStore(),
  // Only for stores whose backend deletes expired records itself (Redis key expiry).
  nativeExpiry: false,
  // Only for a store whose clock is this process's Date.now() (like this in-memory one):
  // every other store must date leases and TTLs by its backend's clock.
  processClock: true,
  // End pools, quit clients, drop the test schema here.
  cleanup: async () => {},
});
