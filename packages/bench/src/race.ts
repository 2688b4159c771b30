import { randomUUID } from 'node:crypto';
import { ORDER_BODY } from './config.js';
import type { RunningServer } from './processes.js';

export interface RaceResult {
  /** Parallel requests sent, all with one key. */
  readonly requests: number;
  /** Times the (50 ms) handler ran for them: 1 is the right answer. */
  readonly handlerRuns: number;
  /** Status code → count. */
  readonly statuses: Record<string, number>;
}

/** 50 parallel POSTs with one fresh key to the slow handler; counts how often it ran. */
export async function raceCheck(server: RunningServer, requests = 50): Promise<RaceResult> {
  const key = `race-${randomUUID()}`;
  const before = (await server.stats()).slowRuns;
  const statuses = await Promise.all(
    Array.from({ length: requests }, async () => {
      const response = await fetch(`${server.url}/slow`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': key },
        body: ORDER_BODY,
      });
      await response.arrayBuffer();
      return response.status;
    }),
  );
  const counts: Record<string, number> = {};
  for (const status of statuses) counts[status] = (counts[status] ?? 0) + 1;
  // Every handler counts itself when it starts, before its own response: all are counted now.
  const after = (await server.stats()).slowRuns;
  return { requests, handlerRuns: after - before, statuses: counts };
}
