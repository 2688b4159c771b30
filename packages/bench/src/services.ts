import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { envFromProcess, type ServiceEnv } from './config.js';

const run = promisify(execFile);
/** The repository root, from packages/bench/dist (or src, under vitest). */
export const REPO_ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const SERVICES = join(REPO_ROOT, 'scripts/services.sh');

export interface Services {
  readonly env: ServiceEnv;
  /** How the services came: the caller's TEST_* variables, or scripts/services.sh. */
  readonly source: 'env' | 'services.sh';
  /** Leaves (services.sh `down`: stops only what it started, once no other owner is left). */
  release(): Promise<void>;
}

function complete(env: ServiceEnv): boolean {
  return Boolean(env.postgres && env.redis && env.redisCluster && env.mongodb);
}

/**
 * TEST_* variables when they are all set; otherwise `scripts/services.sh up` with this process
 * as the registered owner, read back from the env file it writes.
 */
export async function acquireServices(log: (line: string) => void): Promise<Services> {
  const given = envFromProcess();
  if (complete(given)) return { env: given, source: 'env', release: async () => undefined };
  const dir = mkdtempSync(join(tmpdir(), 'idemkit-bench-'));
  const envFile = join(dir, 'services.env');
  // Given variables still win: services.sh starts nothing for them (SPEC §4).
  const childEnv = { ...process.env, IDEMKIT_SERVICES_OWNER: String(process.pid) };
  log('services: scripts/services.sh up');
  await run('bash', [SERVICES, 'up', envFile], { env: childEnv, maxBuffer: 1 << 22 });
  const { stdout } = await run(
    'bash',
    ['-c', 'source "$1"; printf "%s\\n" "$TEST_POSTGRES_URL" "$TEST_REDIS_URL" "$TEST_REDIS_CLUSTER_NODES" "$TEST_MONGODB_URL"', '_', envFile],
    { env: childEnv },
  );
  const [postgres, redis, redisCluster, mongodb] = stdout.split('\n');
  rmSync(dir, { recursive: true, force: true });
  return {
    env: { postgres, redis, redisCluster, mongodb },
    source: 'services.sh',
    release: async () => {
      await run('bash', [SERVICES, 'down'], { env: childEnv }).catch((error: unknown) => log(`services down failed: ${String(error)}`));
    },
  };
}
