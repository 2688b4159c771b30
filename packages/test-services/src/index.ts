/**
 * Real services for tests, in the order of SPEC §4: a TEST_* variable, else Testcontainers when a
 * container runtime answers, else a loud failure that says how to provide the service.
 */
export type { ClusterNode, ContainerStarters, ResolveOptions, ResolvedService, RuntimeProbe } from './types.js';
export { resolveMongo, resolvePostgres, resolveRedis, resolveRedisCluster } from './resolve.js';
export { ENV, parseClusterNodes } from './env.js';
export { probeContainerRuntime } from './runtime.js';
export { IMAGES, testcontainersStarters } from './containers.js';
export {
  isolatedPostgresSchema,
  uniqueMongoDbName,
  uniquePrefix,
  uniqueSuffix,
  withSearchPath,
  type IsolatedSchema,
} from './isolation.js';
export { answerHoldingProxy, type AnswerHoldingProxy } from './proxy.js';
