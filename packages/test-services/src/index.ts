/**
 * Real services for tests, in the order of SPEC §4: a TEST_* variable, else Testcontainers when a
 * container runtime answers, else a loud failure that says how to provide the service.
 * (Skeleton by the lead: env-var branch only; the Testcontainers branch is added by the
 * test-services work.)
 */
export interface ResolvedService<T> {
  readonly value: T;
  /** Stops what the resolver started (containers); a no-op for URL-provided services. */
  stop(): Promise<void>;
}

export interface ClusterNode {
  readonly host: string;
  readonly port: number;
}

function fromEnv(name: string): string | undefined {
  const v = process.env[name];
  return v === undefined || v.trim() === '' ? undefined : v.trim();
}

function missing(service: string, variable: string, example: string): Error {
  return new Error(
    `[idemkit:test-services] No ${service} for tests. Set ${variable} (e.g. ${variable}=${example}), ` +
      'or make a Docker-compatible container runtime reachable for Testcontainers, ' +
      'or run the suite with `pnpm test` (scripts/test.sh starts local servers on this machine kind).',
  );
}

const noop = async (): Promise<void> => {};

export async function resolvePostgres(): Promise<ResolvedService<string>> {
  const url = fromEnv('TEST_POSTGRES_URL');
  if (url) return { value: url, stop: noop };
  throw missing('PostgreSQL', 'TEST_POSTGRES_URL', 'postgres://postgres@127.0.0.1:5432/test');
}

export async function resolveRedis(): Promise<ResolvedService<string>> {
  const url = fromEnv('TEST_REDIS_URL');
  if (url) return { value: url, stop: noop };
  throw missing('Redis', 'TEST_REDIS_URL', 'redis://127.0.0.1:6379');
}

export async function resolveRedisCluster(): Promise<ResolvedService<ClusterNode[]>> {
  const nodes = fromEnv('TEST_REDIS_CLUSTER_NODES');
  if (nodes) {
    return {
      value: nodes.split(',').map((n) => {
        const [host, port] = n.trim().split(':');
        return { host: host ?? '127.0.0.1', port: Number(port) };
      }),
      stop: noop,
    };
  }
  throw missing('Redis Cluster', 'TEST_REDIS_CLUSTER_NODES', '127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003');
}

export async function resolveMongo(): Promise<ResolvedService<string>> {
  const url = fromEnv('TEST_MONGODB_URL');
  if (url) return { value: url, stop: noop };
  throw missing('MongoDB', 'TEST_MONGODB_URL', 'mongodb://127.0.0.1:27017');
}
