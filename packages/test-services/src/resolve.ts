import { testcontainersStarters } from './containers.js';
import { ENV, parseClusterNodes, readVar } from './env.js';
import { probeContainerRuntime } from './runtime.js';
import type { ClusterNode, ContainerStarters, ResolveOptions, ResolvedService } from './types.js';

const noop = async (): Promise<void> => {};

interface ServiceSpec<T> {
  readonly label: string;
  readonly variable: string;
  readonly example: string;
  readonly parse: (raw: string) => T;
  readonly starter: keyof ContainerStarters;
}

function missing(spec: ServiceSpec<unknown>, runtimeReason: string): Error {
  return new Error(
    `[idemkit:test-services] No ${spec.label} for tests: ${spec.variable} is not set and no container runtime ` +
      `answered for Testcontainers (${runtimeReason}). Set ${spec.variable} (e.g. ${spec.variable}=${spec.example}), ` +
      'start a Docker-compatible engine, or run the whole suite with `pnpm test` ' +
      '(scripts/test.sh starts local servers and sets every TEST_* variable).',
  );
}

/** SPEC §4 order: the variable, else Testcontainers if a runtime answers, else a loud failure. */
async function resolve<T>(spec: ServiceSpec<T>, options: ResolveOptions): Promise<ResolvedService<T>> {
  const raw = readVar(options.env ?? process.env, spec.variable);
  if (raw !== undefined) return { value: spec.parse(raw), stop: noop };

  const probe = await (options.probeRuntime ?? probeContainerRuntime)();
  if (!probe.available) throw missing(spec, probe.reason);

  const start = (options.starters?.[spec.starter] ?? testcontainersStarters[spec.starter]) as () => Promise<
    ResolvedService<T>
  >;
  return start();
}

const identity = (raw: string): string => raw;

export function resolvePostgres(options: ResolveOptions = {}): Promise<ResolvedService<string>> {
  return resolve(
    {
      label: 'PostgreSQL',
      variable: ENV.postgres,
      example: 'postgres://postgres@127.0.0.1:5432/test',
      parse: identity,
      starter: 'postgres',
    },
    options,
  );
}

export function resolveRedis(options: ResolveOptions = {}): Promise<ResolvedService<string>> {
  return resolve(
    { label: 'Redis', variable: ENV.redis, example: 'redis://127.0.0.1:6379', parse: identity, starter: 'redis' },
    options,
  );
}

export function resolveRedisCluster(options: ResolveOptions = {}): Promise<ResolvedService<ClusterNode[]>> {
  return resolve(
    {
      label: 'Redis Cluster',
      variable: ENV.redisCluster,
      example: '127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103',
      parse: parseClusterNodes,
      starter: 'redisCluster',
    },
    options,
  );
}

export function resolveMongo(options: ResolveOptions = {}): Promise<ResolvedService<string>> {
  return resolve(
    {
      label: 'MongoDB',
      variable: ENV.mongo,
      example: 'mongodb://127.0.0.1:27117',
      parse: identity,
      starter: 'mongo',
    },
    options,
  );
}
