// The factory and its store type: what users call and hold.
export { createRedisStore, type RedisStore } from './redis-store.js';
// Options and their defaults, for users who build options programmatically or document them.
export {
  REDIS_STORE_DEFAULTS,
  type RedisClient,
  type RedisClientOptions,
  type RedisStoreSettings,
  type RedisUrlOptions,
  type RedisStoreOptions,
  type ResolvedRedisStoreOptions,
} from './options.js';
