import { randomUUID } from 'node:crypto';
import { HANG_HEADER, ORDER_BODY } from './config.js';
import type { RunningServer } from './processes.js';

/** idemkit's `leaseMs` in the crash check: short, so its takeover shows within seconds. */
export const CRASH_LEASE_MS = 2_000;
/** How long past the lease (or `CRASH_LEASE_MS`, for a library without one) the retries go on. */
const RETRY_PAST_LEASE_MS = 4_000;
const RETRY_EVERY_MS = 100;

export interface CrashResult {
  /** idemkit's lease in the check; null for a library without leases. */
  readonly leaseMs: number | null;
  /** What the first retry, on a fresh process right after the kill, got. */
  readonly firstRetryStatus: number;
  /**
   * ms from the kill to the first retry's answer: the fresh server's start-up. On a slow machine
   * it can outlast the lease, and the first retry then runs at once (no 409 at all).
   */
  readonly restartMs: number;
  /**
   * ms from the kill to the first answer other than 409, after at least one 409; 0 when the first
   * retry already got another answer; null when every retry got 409.
   */
  readonly blockedMs: number | null;
  /** The status of that answer (null when every retry got 409). */
  readonly recoveredStatus: number | null;
  /** Times the handler ran on the fresh process: 1 = the retry ran it once, later ones replayed. */
  readonly runsAfterCrash: number;
  /** Three later retries got the recovered answer byte for byte (null when none went through). */
  readonly replaysIdentical: boolean | null;
  /** How long the retries went on (the check's bound when every one got 409). */
  readonly retriedMs: number;
  /** ms the store still keeps the dead request's claim when the retries gave up (if known). */
  readonly stillHeldMs: number | null;
}

interface Answer {
  readonly status: number;
  readonly body: string;
}

async function post(url: string, key: string, hang: boolean): Promise<Answer> {
  const response = await fetch(`${url}/crash`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'idempotency-key': key, ...(hang ? { [HANG_HEADER]: '1' } : {}) },
    body: ORDER_BODY,
  });
  return { status: response.status, body: await response.text() };
}

const pause = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * What a retry gets after the process running a key's handler dies (SIGKILL mid-handler, as a
 * deploy or the OOM killer would). One request with a fresh key starts the handler, which never
 * answers; once it runs, its server is killed, a fresh server on the same store starts, and the
 * same request is retried every 100 ms until it gets something other than 409, or for 4 s past
 * the lease (`CRASH_LEASE_MS` for a library without one) since the kill. `start` starts a server of the library on the same store and run id
 * each time; `heldFor` reads how long the store keeps the dead claim (for libraries without a
 * lease, where the retries give up).
 */
export async function crashCheck(
  start: () => Promise<RunningServer>,
  leaseMs: number | null,
  heldFor: (key: string) => Promise<number | null> = async () => null,
): Promise<CrashResult> {
  const key = `crash-${randomUUID()}`;
  const victim = await start();
  try {
    const hung = post(victim.url, key, true).catch(() => null); // it dies with its server
    const deadline = Date.now() + 10_000;
    // Polling a counter (the handler has started), not ordering events by sleeping.
    while ((await victim.stats()).crashRuns < 1) {
      if (Date.now() > deadline) throw new Error('crash check: the handler did not start in 10 s');
      await pause(20);
    }
    await victim.kill();
    await hung;
  } finally {
    await victim.kill();
  }
  const killedAt = performance.now();
  const retryForMs = (leaseMs ?? CRASH_LEASE_MS) + RETRY_PAST_LEASE_MS;
  const fresh = await start();
  try {
    const first = await post(fresh.url, key, false);
    const restartMs = performance.now() - killedAt;
    let current = first;
    while (current.status === 409 && performance.now() - killedAt < retryForMs) {
      await pause(RETRY_EVERY_MS);
      current = await post(fresh.url, key, false);
    }
    const retriedMs = performance.now() - killedAt;
    if (current.status === 409) {
      const runsAfterCrash = (await fresh.stats()).crashRuns;
      return { leaseMs, firstRetryStatus: first.status, restartMs, blockedMs: null, recoveredStatus: null, runsAfterCrash, replaysIdentical: null, retriedMs, stillHeldMs: await heldFor(key) };
    }
    const later = await Promise.all([0, 1, 2].map(() => post(fresh.url, key, false)));
    return {
      leaseMs,
      firstRetryStatus: first.status,
      restartMs,
      blockedMs: first.status === 409 ? retriedMs : 0,
      recoveredStatus: current.status,
      runsAfterCrash: (await fresh.stats()).crashRuns,
      replaysIdentical: later.every((answer) => answer.status === current.status && answer.body === current.body),
      retriedMs,
      stillHeldMs: null,
    };
  } finally {
    await fresh.stop();
  }
}
