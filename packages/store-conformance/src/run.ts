import { afterAll, describe } from 'vitest';
import { createContext, type SuiteContext } from './context.js';
import type { StoreConformanceOptions } from './options.js';
import { beginSuite } from './suite-begin.js';
import { bytesSuite } from './suite-bytes.js';
import { closeSuite } from './suite-close.js';
import { completeSuite } from './suite-complete.js';
import { concurrencySuite } from './suite-concurrency.js';
import { keysSuite } from './suite-keys.js';
import { leaseSuite } from './suite-lease.js';
import { purgeSuite } from './suite-purge.js';
import { ttlSuite } from './suite-ttl.js';

/** The contract clauses, in the order they run. Names match the describe titles. */
export const conformanceClauses = [
  // Purge first: its exact counts must not include records other clauses let expire.
  { name: 'purgeExpired', covers: 'deletes only expired records, in batches of `limit`, returns the count', run: purgeSuite },
  { name: 'begin', covers: 'claims a new key with a fresh token, or returns the live record and lease time left', run: beginSuite },
  { name: 'complete', covers: 'only the holder stores a response; replays see it exactly; the old token is dead afterwards', run: completeSuite },
  { name: 'lease', covers: 'takeover after lease expiry, fencing of the stale holder, renew, release', run: leaseSuite },
  { name: 'ttl', covers: 'completed records expire after their TTL, counted from completion', run: ttlSuite },
  { name: 'concurrency', covers: 'exactly one of 200 concurrent callers wins, also across two clients', run: concurrencySuite },
  { name: 'response bytes', covers: 'empty, all-byte-values and 1 MiB bodies, repeated headers and 8 KiB values round-trip exactly', run: bytesSuite },
  { name: 'keys', covers: 'SQL/Lua/pattern/operator/unicode keys are data; distinct keys never collide', run: keysSuite },
  { name: 'close', covers: 'close() twice is safe and leaves stores sharing the client working', run: closeSuite },
] as const satisfies ReadonlyArray<{ name: string; covers: string; run: (ctx: SuiteContext) => void }>;

/**
 * Registers the whole conformance suite (vitest `describe`/`it`) for one store. Call it at the top
 * level of a test file.
 */
export function runStoreConformance(options: StoreConformanceOptions): void {
  describe(`store conformance: ${options.name}`, () => {
    const ctx = createContext(options);
    for (const clause of conformanceClauses) clause.run(ctx);
    // Nested afterAll hooks (closing each clause's store) run before this one.
    afterAll(async () => {
      await options.cleanup?.();
    });
  });
}
