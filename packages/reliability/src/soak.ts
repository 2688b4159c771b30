/**
 * Issue 10.7: a soak at moderate load against one store at a time. Two app processes (Fastify and
 * Express) share the store; workers send new keys, duplicate storms (one key to both apps at once)
 * and late retries through @idemkit/client for `seconds`. Afterwards: every key ran exactly once
 * (executions == distinct keys), every answer for a key is identical, no record is left
 * in_progress, and the apps' heap after a full GC did not grow (no leaked leases, timers, records).
 */
import { createIdempotentFetch } from '@idemkit/client';
import { countRecords, dropNamespace, location, type StoreKind } from './records.js';
import { namespace, serviceUrl } from './services.js';
import { APP, spawnServer, type ServerProcess } from './spawn.js';

export interface SoakOptions {
  readonly store: StoreKind;
  readonly seconds: number;
  /** Concurrent workers. @default 12 */
  readonly concurrency?: number;
  readonly log?: (line: string) => void;
}

export interface MemorySample {
  readonly at: number;
  readonly heapUsed: number;
  readonly rss: number;
}

export interface SoakReport {
  readonly store: StoreKind;
  readonly seconds: number;
  readonly requests: number;
  readonly keys: number;
  readonly executions: number;
  /** Keys that ran other than exactly once. */
  readonly wrongRuns: string[];
  /** Answers that were not 201 or differed from the key's first answer. */
  readonly badAnswers: string[];
  readonly inProgressLeft: number;
  /** Per app: heap and RSS after a full GC, sampled every 2 s. */
  readonly memory: MemorySample[][];
  readonly heapGrowthBytes: number;
  readonly rssGrowthBytes: number;
  readonly failures: string[];
}

/** Allowed growth of the post-GC heap between the end of warm-up and the end of the run. */
const HEAP_SLACK_BYTES = 4 * 1024 * 1024; // post-GC noise over a 30 s run is ~0.5 MB
const RSS_SLACK_BYTES = 96 * 1024 * 1024;
/**
 * Short leases make renewal work hard under load. FerretDB on SQLite (the MongoDB wire server CI
 * uses) answers in hundreds of ms under this load, with four round trips per renewal in its
 * 'claims' fencing, so 2 s is shorter than its renew + complete tail: a holder then loses its
 * lease while alive, which the Guarantees list as "does not hold". 10 s keeps the soak about
 * leaks and exactly-once under load, not about a lease shorter than the store's latency.
 */
const leaseMsFor = (store: string): number => (store === 'mongodb' ? 10_000 : 2_000);

export async function runSoak(options: SoakOptions): Promise<SoakReport> {
  const { store, seconds } = options;
  const concurrency = options.concurrency ?? 12;
  const log = options.log ?? (() => undefined);
  const url = await serviceUrl(store);
  const ns = namespace(`soak_${store.replace('-', '_')}`);
  const env = { STORE: store, STORE_URL: url, PREFIX: ns, LEASE_MS: String(leaseMsFor(store)), WORK_MS: '5', TRACK: '0' };
  const apps: ServerProcess[] = [];
  try {
    apps.push(...(await Promise.all(['fastify', 'express'].map((FRAMEWORK) => spawnServer(APP, { ...env, FRAMEWORK }, ['--expose-gc'])))));
    const fetchSafe = createIdempotentFetch({ baseDelayMs: 20, maxDelayMs: 300, maxAttempts: 50, deadlineMs: 30_000 });
    const first = new Map<string, string>();
    const recent: string[] = [];
    const badAnswers: string[] = [];
    let requests = 0;
    let serial = 0;

    const send = async (app: ServerProcess, key: string) => {
      requests++;
      const res = await fetchSafe(`${app.url}/orders`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ key }),
        idempotencyKey: key,
      });
      const text = await res.text();
      if (res.status !== 201) {
        badAnswers.push(`${key}: ${res.status} ${text.slice(0, 200)}`);
        return;
      }
      // The handler's answer carries a fresh id per execution: equal text means the same execution.
      const seen = first.get(key);
      if (seen === undefined) first.set(key, text);
      else if (seen !== text) badAnswers.push(`${key}: two different answers`);
    };

    const memory: MemorySample[][] = apps.map(() => []);
    const started = Date.now();
    const sample = async () => {
      await Promise.all(
        apps.map(async (app, i) => {
          const s = (await (await fetch(`${app.url}/stats?gc=1`)).json()) as { heapUsed: number; rss: number };
          memory[i]!.push({ at: Date.now() - started, heapUsed: s.heapUsed, rss: s.rss });
        }),
      );
    };
    await sample();
    const sampler = setInterval(() => void sample().catch(() => undefined), 2_000);

    const deadline = started + seconds * 1_000;
    const worker = async () => {
      while (Date.now() < deadline) {
        const roll = Math.random();
        if (roll < 0.55 || recent.length === 0) {
          const key = `${ns}-${serial++}`;
          await send(apps[serial % 2]!, key);
          remember(recent, key);
        } else if (roll < 0.8) {
          // A duplicate storm: the same new key on both apps at once, twice each.
          const key = `${ns}-${serial++}`;
          await Promise.all([apps[0]!, apps[1]!, apps[0]!, apps[1]!].map((app) => send(app, key)));
          remember(recent, key);
        } else {
          await send(apps[Math.floor(Math.random() * 2)]!, recent[Math.floor(Math.random() * recent.length)]!);
        }
      }
    };
    const progress = setInterval(() => {
      log(`  ${store}: ${Math.round((Date.now() - started) / 1000)} s, ${requests} requests, ${first.size} keys`);
    }, 10_000);
    await Promise.all(Array.from({ length: concurrency }, worker));
    clearInterval(progress);
    clearInterval(sampler);
    await sample();

    // Every handler finished and committed, so nothing may be in progress, now or after the leases.
    const records = await countRecords(store, url, location(store, ns, 'app'));
    const runs = new Map<string, number>();
    for (const app of apps) for (const e of app.events('RUN')) runs.set(String(e.key), (runs.get(String(e.key)) ?? 0) + 1);
    const wrongRuns = [...first.keys()].filter((k) => runs.get(k) !== 1).map((k) => `${k}: ran ${runs.get(k) ?? 0}×`);
    const executions = [...runs.values()].reduce((a, b) => a + b, 0);

    // Growth from the end of warm-up (a quarter of the run) to the end, worst app.
    const growth = (pick: (s: MemorySample) => number) =>
      Math.max(
        ...memory.map((samples) => {
          const warm = samples.find((s) => s.at >= (seconds * 1000) / 4) ?? samples[0]!;
          return pick(samples[samples.length - 1]!) - pick(warm);
        }),
      );
    const heapGrowthBytes = growth((s) => s.heapUsed);
    const rssGrowthBytes = growth((s) => s.rss);

    const failures: string[] = [];
    if (badAnswers.length > 0) failures.push(`${badAnswers.length} bad answers, e.g. ${badAnswers.slice(0, 3).join('; ')}`);
    if (wrongRuns.length > 0) {
      failures.push(`${wrongRuns.length} keys did not run exactly once, e.g. ${wrongRuns.slice(0, 3).join('; ')}`);
      // What the engine said about those keys (takeovers, refused completions), for the diagnosis.
      const bad = new Set([...first.keys()].filter((k) => runs.get(k) !== 1));
      const said = apps.flatMap((app) =>
        ['LEASE-LOST', 'LEASE-TAKEN-OVER'].flatMap((kind) => app.events(kind).filter((e) => [...bad].some((k) => String(e.key).endsWith(k))).map((e) => `${app.pid} ${kind} ${JSON.stringify(e)}`)),
      );
      if (said.length > 0) failures.push(`engine events for them:\n    ${said.slice(0, 12).join('\n    ')}`);
    }
    if (executions !== first.size) failures.push(`executions ${executions} != distinct keys ${first.size}`);
    if (records.inProgress !== 0) failures.push(`${records.inProgress} records left in_progress`);
    if (records.total !== first.size) failures.push(`${records.total} records for ${first.size} keys`);
    if (heapGrowthBytes > HEAP_SLACK_BYTES) failures.push(`heap after GC grew by ${mb(heapGrowthBytes)} (allowed ${mb(HEAP_SLACK_BYTES)})`);
    if (rssGrowthBytes > RSS_SLACK_BYTES) failures.push(`RSS grew by ${mb(rssGrowthBytes)} (allowed ${mb(RSS_SLACK_BYTES)})`);
    for (const app of apps) if (app.child.exitCode !== null) failures.push(`app ${app.pid} exited`);

    return {
      store,
      seconds,
      requests,
      keys: first.size,
      executions,
      wrongRuns,
      badAnswers,
      inProgressLeft: records.inProgress,
      memory,
      heapGrowthBytes,
      rssGrowthBytes,
      failures,
    };
  } finally {
    await Promise.all(apps.map((a) => a.stop()));
    await dropNamespace(store, url, [`${ns}_keys`], `${ns}:`);
  }
}

function remember(recent: string[], key: string): void {
  recent.push(key);
  if (recent.length > 500) recent.shift();
}

export const mb = (bytes: number) => `${(bytes / 1024 / 1024).toFixed(1)} MB`;

export function summary(r: SoakReport): string {
  return (
    `${r.failures.length === 0 ? 'PASS' : 'FAIL'} ${r.store}: ${r.seconds} s, ${r.requests} requests (${Math.round(r.requests / r.seconds)}/s), ` +
    `${r.keys} keys, ${r.executions} executions, ${r.inProgressLeft} in progress left, ` +
    `heap growth ${mb(r.heapGrowthBytes)}, RSS growth ${mb(r.rssGrowthBytes)}` +
    (r.failures.length > 0 ? `\n  ${r.failures.join('\n  ')}` : '')
  );
}
