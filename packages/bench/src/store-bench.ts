import type { LeaseToken, StoredResponse } from '@idemkit/core';
import type { ServiceEnv, StoreName } from './config.js';
import { openStore } from './stores.js';

export interface StoreBenchResult {
  readonly store: StoreName;
  /** begin + complete on new keys, per second. */
  readonly pairsPerSec: number;
  readonly pairP50: number;
  readonly pairP99: number;
  /** Round trips of one begin + complete (the SPEC's budget: 2). */
  readonly roundTripsPerPair: number;
  /** begin on a completed key (a replay), per second. */
  readonly replaysPerSec: number;
  /** Round trips of one replaying begin (budget: 1). */
  readonly roundTripsPerReplay: number;
}

const body = new TextEncoder().encode(JSON.stringify({ id: 'ord_123', sku: 'A1', qty: 2, note: 'benchmark order' }));
const response: StoredResponse = { status: 201, headers: [['content-type', 'application/json; charset=utf-8']], body };

function percentile(sorted: number[], q: number): number {
  return sorted.length === 0 ? 0 : (sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? 0);
}

/** Runs `op` from `concurrency` workers for `seconds`; returns ops/s and sorted latencies. */
async function phase(seconds: number, concurrency: number, op: (i: number) => Promise<void>): Promise<{ ops: number; rate: number; latencies: number[] }> {
  let ops = 0;
  const latencies: number[] = [];
  const started = performance.now();
  const deadline = started + seconds * 1000;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < deadline) {
        const t0 = performance.now();
        await op(ops++);
        latencies.push(performance.now() - t0);
      }
    }),
  );
  latencies.sort((a, b) => a - b);
  return { ops, rate: ops / ((performance.now() - started) / 1000), latencies };
}

/** begin+complete pairs per second and round trips per operation, against the real store. */
export async function benchStore(name: StoreName, env: ServiceEnv, runId: string, seconds: number, concurrency = 32): Promise<StoreBenchResult> {
  const counted = await openStore(name, env, runId, concurrency);
  const { store } = counted;
  try {
    // The most recent keys (a ring): the memory store evicts its oldest records once full.
    const completed: string[] = [];
    let written = 0;
    const pair = async (key: string): Promise<void> => {
      const begun = await store.begin(key, 'fp', 30_000);
      if (begun.kind !== 'acquired') throw new Error(`${name}: key ${key} was not new`);
      if (!(await store.complete(key, begun.token as LeaseToken, response, 600_000))) throw new Error(`${name}: complete refused`);
      completed[written++ % 5_000] = key;
    };
    // Warm up: connections, prepared statements, script cache, slot map, server clock.
    for (let i = 0; i < 100; i++) await pair(`warm:${runId}:${i}`);
    let before = counted.roundTrips();
    const pairs = await phase(seconds, concurrency, (i) => pair(`new:${runId}:${i}`));
    const roundTripsPerPair = (counted.roundTrips() - before) / pairs.ops;
    before = counted.roundTrips();
    const replays = await phase(seconds, concurrency, async (i) => {
      const begun = await store.begin(completed[i % completed.length] ?? '', 'fp', 30_000);
      if (begun.kind !== 'existing') throw new Error(`${name}: replay did not find the record`);
    });
    return {
      store: name,
      pairsPerSec: pairs.rate,
      pairP50: percentile(pairs.latencies, 0.5),
      pairP99: percentile(pairs.latencies, 0.99),
      roundTripsPerPair,
      replaysPerSec: replays.rate,
      roundTripsPerReplay: (counted.roundTrips() - before) / replays.ops,
    };
  } finally {
    await counted.close();
  }
}
