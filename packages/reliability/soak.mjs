#!/usr/bin/env node
// The soak (issue 10.7): `pnpm --filter @idemkit/reliability soak` or `node soak.mjs`.
// Knobs: --seconds N / SOAK_SECONDS (per store, default 120; CI uses 20), --stores a,b / SOAK_STORES
// (default redis,postgres,mongodb; also redis-cluster), SOAK_CONCURRENCY (default 12).
// Services come from TEST_* (scripts/services.sh up ENVFILE); the package must be built.
import { existsSync } from 'node:fs';

const dist = new URL('./dist/soak.js', import.meta.url);
if (!existsSync(dist)) {
  console.error('[soak] dist/soak.js is missing: run `pnpm --filter @idemkit/reliability... build` first.');
  process.exit(2);
}
const { runSoak, summary } = await import(dist.href);

const arg = (name) => {
  const i = process.argv.indexOf(`--${name}`);
  return i === -1 ? undefined : process.argv[i + 1];
};
const seconds = Number(arg('seconds') ?? process.env.SOAK_SECONDS ?? 120);
const stores = (arg('stores') ?? process.env.SOAK_STORES ?? 'redis,postgres,mongodb').split(',').filter(Boolean);
const concurrency = Number(process.env.SOAK_CONCURRENCY ?? 12);
if (!Number.isFinite(seconds) || seconds <= 0 || seconds > 3600) {
  console.error('[soak] --seconds must be between 1 and 3600');
  process.exit(2);
}

let failed = 0;
for (const store of stores) {
  console.log(`[soak] ${store}: ${seconds} s at ${concurrency} workers`);
  const report = await runSoak({ store, seconds, concurrency, log: (l) => console.log(l) });
  console.log(summary(report));
  if (report.failures.length > 0) failed++;
}
console.log(`[soak] ${stores.length - failed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
