import { afterAll, describe } from 'vitest';
import { createContext, type SuiteContext } from './context.js';
import { checkOptions, type StoreConformanceOptions } from './options.js';
import { beginSuite } from './suite-begin.js';
import { bytesSuite } from './suite-bytes.js';
import { clockSuite } from './suite-clock.js';
import { closeSuite } from './suite-close.js';
import { completeSuite } from './suite-complete.js';
import { concurrencySuite } from './suite-concurrency.js';
import { keysSuite } from './suite-keys.js';
import { leaseSuite } from './suite-lease.js';
import { purgeSuite } from './suite-purge.js';
import { ttlSuite } from './suite-ttl.js';

/** One clause of the store contract: the describe title it runs under and what it proves. */
export interface ConformanceClause {
  readonly name: string;
  readonly covers: string;
}

type Clause = ConformanceClause & { readonly register: (ctx: SuiteContext) => void };

const clauses: readonly Clause[] = [
  // Purge runs first: its exact counts must not include records that other clauses let expire.
  { name: 'purgeExpired', covers: 'deletes only expired records (completed and abandoned leases), in batches of `limit`, and returns the count', register: purgeSuite },
  { name: 'begin', covers: 'claims a new key with a fresh token, or returns the live record and the lease time left; fingerprints kept exactly', register: beginSuite },
  { name: 'complete', covers: 'only the holder stores a response; get and begin replay it exactly; afterwards the old token is dead', register: completeSuite },
  { name: 'lease', covers: 'takeover only after lease expiry (and promptly then), fencing of the stale holder (also across fresh store instances), renew, release', register: leaseSuite },
  { name: 'ttl', covers: 'completed records expire after their TTL (promptly, and by begin itself), counted from completion', register: ttlSuite },
  { name: 'concurrency', covers: 'exactly one of 200 concurrent callers wins (new key, expired lease, expired record, two clients)', register: concurrencySuite },
  { name: 'clock', covers: "leases, TTLs, time left, renew and purge go by the store's clock, with this process's clock an hour fast or slow (skipped with `processClock`)", register: clockSuite },
  { name: 'response bytes', covers: 'empty, every-byte-value and 1 MiB bodies, repeated headers in order, 8 KiB and obs-text values round-trip exactly', register: bytesSuite },
  { name: 'keys', covers: 'SQL, Lua, pattern, operator, control and non-ASCII characters are data; distinct keys never collide', register: keysSuite },
  { name: 'close', covers: 'close() twice is safe and leaves other stores on the same client working', register: closeSuite },
];

/** The contract clauses in the order they run; their names are the describe titles. */
export const conformanceClauses: readonly ConformanceClause[] = clauses.map(({ name, covers }) => ({ name, covers }));

/**
 * Registers the whole conformance suite (vitest `describe`/`it`) for one store. Call it at the top
 * level of a test file; every clause gets its own store from `createStore`.
 */
export function runStoreConformance(options: StoreConformanceOptions): void {
  checkOptions(options);
  describe(`store conformance: ${options.name}`, () => {
    const ctx = createContext(options);
    for (const clause of clauses) describe(clause.name, () => clause.register(ctx));
    // Nested afterAll hooks (closing each clause's store) run before this one.
    afterAll(async () => {
      await options.cleanup?.();
    });
  });
}
