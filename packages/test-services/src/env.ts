import type { ClusterNode } from './types.js';

/** The variables of SPEC §4, one per service. */
export const ENV = {
  postgres: 'TEST_POSTGRES_URL',
  redis: 'TEST_REDIS_URL',
  redisCluster: 'TEST_REDIS_CLUSTER_NODES',
  mongo: 'TEST_MONGODB_URL',
} as const;

export function readVar(env: Readonly<Record<string, string | undefined>>, name: string): string | undefined {
  const v = env[name];
  return v === undefined || v.trim() === '' ? undefined : v.trim();
}

/** Parses `host:port,host:port`; throws on a malformed entry so a typo fails loudly. */
export function parseClusterNodes(list: string): ClusterNode[] {
  const nodes = list
    .split(',')
    .map((entry) => entry.trim())
    .filter((entry) => entry !== '')
    .map((entry) => {
      const at = entry.lastIndexOf(':');
      const host = at > 0 ? entry.slice(0, at) : '';
      const port = Number(at > 0 ? entry.slice(at + 1) : NaN);
      if (host === '' || !Number.isInteger(port) || port <= 0 || port > 65535) {
        throw new Error(
          `[idemkit:test-services] ${ENV.redisCluster} has a malformed entry "${entry}"; expected host:port[,host:port...]`,
        );
      }
      return { host, port };
    });
  if (nodes.length === 0) {
    throw new Error(`[idemkit:test-services] ${ENV.redisCluster} lists no node; expected host:port[,host:port...]`);
  }
  return nodes;
}
