import { afterAll, afterEach, beforeAll, describe } from 'vitest';
import { concurrencyCases } from './cases-concurrency.js';
import { failureCases, transactionalCases } from './cases-failure.js';
import { keyCases } from './cases-keys.js';
import { lifecycleCases } from './cases-lifecycle.js';
import { releaseCases } from './cases-release.js';
import { replayCases } from './cases-replay.js';
import { createCaseContext, type Framework } from './context.js';
import type { StartApp } from './contract.js';
import { openStore, STORE_NAMES, type StoreHarness, type StoreName } from './stores.js';

export interface HttpSuiteOptions {
  /** Names the tests: `express × postgres: …`. */
  readonly framework: Framework;
  /** Starts the binding's test app (see `contract.ts`) on 127.0.0.1, port 0. */
  readonly startApp: StartApp;
  /**
   * Stores to run against. @default every store: memory, postgres, redis, redis-cluster, mongodb.
   * Narrow it only while debugging; CI runs all of them (a missing service fails, never skips).
   */
  readonly stores?: readonly StoreName[];
}

/**
 * The whole SPEC §2 table, once per store, through real HTTP (fetch on 127.0.0.1) and real
 * concurrency. Call it at the top level of a vitest file.
 */
export function runHttpSuite(options: HttpSuiteOptions): void {
  for (const storeName of options.stores ?? STORE_NAMES) {
    describe(`${options.framework} × ${storeName}`, () => {
      let harness: StoreHarness | undefined;
      const open: Array<() => Promise<void>> = [];

      beforeAll(async () => {
        harness = await openStore(storeName);
      });
      afterEach(async () => {
        await Promise.all(open.splice(0).map((close) => close()));
      });
      afterAll(async () => {
        await harness?.close();
      });

      const t = createCaseContext(
        options.framework,
        storeName,
        options.startApp,
        () => {
          if (!harness) throw new Error(`the ${storeName} store did not open (see the beforeAll error)`);
          return harness;
        },
        (close) => open.push(close),
      );
      keyCases(t);
      replayCases(t);
      concurrencyCases(t);
      releaseCases(t);
      lifecycleCases(t);
      failureCases(t);
      if (storeName === 'postgres') transactionalCases(t);
    });
  }
}
