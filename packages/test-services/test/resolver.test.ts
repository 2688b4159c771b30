import { describe, expect, it, vi } from 'vitest';
import {
  parseClusterNodes,
  probeContainerRuntime,
  resolveMongo,
  resolvePostgres,
  resolveRedis,
  resolveRedisCluster,
  type ContainerStarters,
  type ResolvedService,
} from '../src/index.js';

// These cover the resolver's own seams (environment, runtime probe, container starters); the
// smoke tests beside this file talk to real servers.
const noRuntime = async () => ({ available: false as const, reason: 'Could not find a working container runtime strategy' });
const runtime = async () => ({ available: true as const });
const unexpected = () => Promise.reject(new Error('starter must not run'));
const failingStarters: ContainerStarters = {
  postgres: unexpected,
  redis: unexpected,
  redisCluster: unexpected,
  mongo: unexpected,
};

describe('resolver: a TEST_* variable is given', () => {
  it('returns the URL, never probes, and stop() is a no-op', async () => {
    const probe = vi.fn(noRuntime);
    const env = { TEST_POSTGRES_URL: ' postgres://u@h:1/db ' };
    const svc = await resolvePostgres({ env, probeRuntime: probe, starters: failingStarters });
    expect(svc.value).toBe('postgres://u@h:1/db');
    await svc.stop();
    expect(probe).not.toHaveBeenCalled();
  });

  it('parses TEST_REDIS_CLUSTER_NODES into host/port pairs', async () => {
    const env = { TEST_REDIS_CLUSTER_NODES: '127.0.0.1:7101, 127.0.0.1:7102,localhost:7103' };
    const svc = await resolveRedisCluster({ env, probeRuntime: noRuntime });
    expect(svc.value).toEqual([
      { host: '127.0.0.1', port: 7101 },
      { host: '127.0.0.1', port: 7102 },
      { host: 'localhost', port: 7103 },
    ]);
  });

  it('rejects a malformed cluster list loudly instead of guessing', () => {
    expect(() => parseClusterNodes('127.0.0.1')).toThrow(/TEST_REDIS_CLUSTER_NODES.*malformed/);
    expect(() => parseClusterNodes('127.0.0.1:x')).toThrow(/malformed/);
    expect(() => parseClusterNodes(' , ')).toThrow(/lists no node/);
  });

  it('treats an empty variable as unset', async () => {
    await expect(resolveRedis({ env: { TEST_REDIS_URL: '  ' }, probeRuntime: noRuntime })).rejects.toThrow(
      /TEST_REDIS_URL is not set/,
    );
  });
});

describe('resolver: no variable and no container runtime', () => {
  const cases = [
    ['TEST_POSTGRES_URL', () => resolvePostgres({ env: {}, probeRuntime: noRuntime, starters: failingStarters })],
    ['TEST_REDIS_URL', () => resolveRedis({ env: {}, probeRuntime: noRuntime, starters: failingStarters })],
    [
      'TEST_REDIS_CLUSTER_NODES',
      () => resolveRedisCluster({ env: {}, probeRuntime: noRuntime, starters: failingStarters }),
    ],
    ['TEST_MONGODB_URL', () => resolveMongo({ env: {}, probeRuntime: noRuntime, starters: failingStarters })],
  ] as const;

  it.each(cases)('fails with a message naming %s, the runtime reason and `pnpm test`', async (variable, run) => {
    const err = await run().then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(Error);
    const msg = (err as Error).message;
    expect(msg).toContain(`${variable} is not set`);
    expect(msg).toContain(`Set ${variable} (e.g. ${variable}=`);
    expect(msg).toContain('Could not find a working container runtime strategy');
    expect(msg).toContain('pnpm test');
  });
});

describe('resolver: a container runtime answers', () => {
  it('selects the Testcontainers branch and hands back what the starter started', async () => {
    const stopped: string[] = [];
    const started = (name: string, value: string): ResolvedService<string> => ({
      value,
      stop: async () => {
        stopped.push(name);
      },
    });
    const starters: ContainerStarters = {
      postgres: async () => started('postgres', 'postgres://test:test@localhost:32768/test'),
      redis: async () => started('redis', 'redis://localhost:32769'),
      mongo: async () => started('mongo', 'mongodb://localhost:32770/?directConnection=true'),
      redisCluster: async () => ({ value: [{ host: '127.0.0.1', port: 40001 }], stop: async () => void stopped.push('cluster') }),
    };
    const opts = { env: {}, probeRuntime: runtime, starters };

    const pg = await resolvePostgres(opts);
    const redis = await resolveRedis(opts);
    const mongo = await resolveMongo(opts);
    const cluster = await resolveRedisCluster(opts);
    expect([pg.value, redis.value, mongo.value]).toEqual([
      'postgres://test:test@localhost:32768/test',
      'redis://localhost:32769',
      'mongodb://localhost:32770/?directConnection=true',
    ]);
    expect(cluster.value).toEqual([{ host: '127.0.0.1', port: 40001 }]);
    await Promise.all([pg.stop(), redis.stop(), mongo.stop(), cluster.stop()]);
    expect(stopped.sort()).toEqual(['cluster', 'mongo', 'postgres', 'redis']);
  });

  it('lets a given variable win over a reachable runtime', async () => {
    const starter = vi.fn(unexpected);
    const svc = await resolveMongo({
      env: { TEST_MONGODB_URL: 'mongodb://127.0.0.1:27117/' },
      probeRuntime: runtime,
      starters: { mongo: starter },
    });
    expect(svc.value).toBe('mongodb://127.0.0.1:27117/');
    expect(starter).not.toHaveBeenCalled();
  });
});

describe('probeContainerRuntime (real Testcontainers, whatever this machine has)', () => {
  it('answers with a verdict, and with a reason when there is no runtime', async () => {
    const probe = await probeContainerRuntime();
    if (!probe.available) expect(probe.reason).not.toBe('');
    else expect(probe).toEqual({ available: true });
  });
});
