import { existsSync } from 'node:fs';
import { APP, DEMO, JOB_WORKER } from '../../src/spawn.js';

/** The tests start built servers; say how to build them instead of failing on a spawn error. */
export default function setup(): void {
  const missing = [APP, DEMO, JOB_WORKER].filter((f) => !existsSync(f));
  if (missing.length > 0) {
    throw new Error(`[reliability] missing ${missing.join(', ')}: run \`pnpm --filter @idemkit/reliability... build\` first.`);
  }
}
