import { createServer } from 'node:net';
import type { ClusterNode, ContainerStarters, ResolvedService } from './types.js';

/** Images for the Testcontainers branch: the server versions this machine kind runs, plus MongoDB 7. */
export const IMAGES = {
  postgres: 'postgres:15-alpine',
  redis: 'redis:7.2-alpine',
  mongo: 'mongo:7.0',
} as const;

interface Stoppable {
  stop(): Promise<unknown>;
}

function service<T>(value: T, container: Stoppable): ResolvedService<T> {
  return {
    value,
    stop: async () => {
      await container.stop();
    },
  };
}

async function startPostgres(): Promise<ResolvedService<string>> {
  const { PostgreSqlContainer } = await import('@testcontainers/postgresql');
  const c = await new PostgreSqlContainer(IMAGES.postgres)
    .withDatabase('test')
    .withUsername('postgres')
    .withPassword('postgres')
    .start();
  return service(c.getConnectionUri(), c);
}

async function startRedis(): Promise<ResolvedService<string>> {
  const { RedisContainer } = await import('@testcontainers/redis');
  const c = await new RedisContainer(IMAGES.redis).start();
  return service(c.getConnectionUrl(), c);
}

async function startMongo(): Promise<ResolvedService<string>> {
  const { MongoDBContainer } = await import('@testcontainers/mongodb');
  const c = await new MongoDBContainer(IMAGES.mongo).start();
  // The container is a one-member replica set named after the container's hostname, which the
  // host cannot resolve: talk to the mapped port directly instead of following the topology.
  return service(`${c.getConnectionString()}/?directConnection=true`, c);
}

/** A port free on 127.0.0.1 right now, below 55535 so that port+10000 (the cluster bus) is valid. */
async function freeClientPort(): Promise<number> {
  for (;;) {
    const port = await new Promise<number>((resolve, reject) => {
      const srv = createServer();
      srv.once('error', reject);
      srv.listen(0, '127.0.0.1', () => {
        const addr = srv.address();
        const p = typeof addr === 'object' && addr !== null ? addr.port : 0;
        srv.close(() => resolve(p));
      });
    });
    if (port > 0 && port < 55535) return port;
  }
}

/**
 * Three cluster masters in ONE container rather than three containers: Redis Cluster hands clients
 * the address each node announces, and a node in its own container can only announce an address
 * the host cannot reach (its bridge IP) or a mapped port its peers cannot reach. In one container
 * the nodes meet over the container's loopback and announce 127.0.0.1 with container ports bound
 * to the same host ports, so the addresses in CLUSTER SLOTS work from the host. Limitation: the
 * container runtime must publish ports on this machine's loopback (a local Docker/Podman engine,
 * not a remote DOCKER_HOST); for anything else give TEST_REDIS_CLUSTER_NODES.
 */
async function startRedisCluster(): Promise<ResolvedService<ClusterNode[]>> {
  const { GenericContainer, Wait, getContainerRuntimeClient } = await import('testcontainers');
  const runtime = await getContainerRuntimeClient();
  const host = runtime.info.containerRuntime.host;
  if (!['localhost', '127.0.0.1', '::1'].includes(host)) {
    throw new Error(
      `[idemkit:test-services] The container runtime publishes ports on ${host}, but the in-container Redis ` +
        'Cluster announces 127.0.0.1. Set TEST_REDIS_CLUSTER_NODES to a reachable cluster instead.',
    );
  }
  const ports: number[] = [];
  while (ports.length < 3) {
    const p = await freeClientPort();
    if (!ports.includes(p)) ports.push(p);
  }
  const node = (p: number): string =>
    `redis-server --port ${p} --cluster-enabled yes --cluster-config-file nodes-${p}.conf ` +
    `--cluster-announce-ip 127.0.0.1 --bind 0.0.0.0 --protected-mode no --save '' --appendonly no --daemonize yes`;
  const script = [
    ...ports.map(node),
    ...ports.map((p) => `until redis-cli -p ${p} ping >/dev/null 2>&1; do sleep 0.1; done`),
    `redis-cli --cluster create ${ports.map((p) => `127.0.0.1:${p}`).join(' ')} --cluster-replicas 0 --cluster-yes`,
    'exec tail -f /dev/null',
  ].join(' && ');
  const ready = ports.map((p) => `redis-cli -p ${p} cluster info | grep -q cluster_state:ok`).join(' && ');
  const c = await new GenericContainer(IMAGES.redis)
    .withExposedPorts(...ports.map((p) => ({ container: p, host: p })))
    .withEntrypoint(['sh', '-c'])
    .withCommand([script])
    .withWaitStrategy(Wait.forSuccessfulCommand(ready))
    .withStartupTimeout(60_000)
    .start();
  return service(
    ports.map((port) => ({ host: '127.0.0.1', port })),
    c,
  );
}

/** The real starters; each imports its optional Testcontainers module only when called. */
export const testcontainersStarters: ContainerStarters = {
  postgres: startPostgres,
  redis: startRedis,
  redisCluster: startRedisCluster,
  mongo: startMongo,
};
