import type { Cluster, Redis } from 'ioredis';

/** An ioredis single-node client or Cluster client. */
export type RedisClient = Redis | Cluster;

/** Options of {@link createRedisStore}: exactly one of `client` or `url`, plus the settings. */
export type RedisStoreOptions = RedisClientOptions | RedisUrlOptions;

/** A client you own. */
export interface RedisClientOptions extends RedisStoreSettings {
  /**
   * An ioredis `Redis` or `Cluster` you own. idemkit defines its scripts on it
   * (`defineCommand`, names prefixed `idemkit`) and never quits or disconnects it.
   */
  client: RedisClient;
  url?: never;
}

/** A client the store creates and quits. */
export interface RedisUrlOptions extends RedisStoreSettings {
  /**
   * A `redis://` / `rediss://` URL. The store then creates its own single-node ioredis client
   * and `close()` quits it. For Redis Cluster pass a `Cluster` as `client`.
   */
  url: string;
  client?: never;
}

/** The options both forms share. */
export interface RedisStoreSettings {
  /**
   * Prepended to every key. Do not put a `{hash tag}` in it: that would pin all records to one
   * Cluster slot (and one master). No tag is needed because every operation touches one key.
   * @default "idemkit:"
   */
  prefix?: string | undefined;
  /**
   * How long an in-progress record stays in Redis after its lease ends, in ms. Within this window
   * a new `begin` reports the takeover (`tookOver: true`); afterwards Redis has dropped the key
   * natively and a new `begin` is a plain claim (`tookOver: false`). Either way the expired
   * lease counts as absent for `get` and its holder can no longer complete, renew or release.
   * @default 60000
   */
  leaseGraceMs?: number | undefined;
  /**
   * How `begin` claims a key. `'set'`: a plain `SET … NX GET`, one round trip for a new key or a
   * replay, plus a script round trip when the key's request is still in flight (or its lease
   * has run out). `'script'`: the begin script straight away, one round trip on every path, for
   * about twice the Redis CPU per new key. Both are atomic and give the same answers.
   * @default "set"
   */
  claim?: 'set' | 'script' | undefined;
}

/** Options after validation, with defaults applied. */
export interface ResolvedRedisStoreOptions {
  readonly prefix: string;
  readonly leaseGraceMs: number;
  readonly claim: 'set' | 'script';
}

/** Defaults applied by {@link createRedisStore} for options left out. */
export const REDIS_STORE_DEFAULTS = Object.freeze({
  prefix: 'idemkit:',
  leaseGraceMs: 60_000,
  claim: 'set',
});

const KNOWN = new Set(['client', 'url', 'prefix', 'leaseGraceMs', 'claim']);

/** A `TypeError` with the package's message prefix. */
export function optionError(message: string): TypeError {
  return new TypeError(`[idemkit] [redis] ${message}`);
}

/** Validate options (naming the offending one) and apply defaults. Throws `TypeError`. */
export function resolveRedisStoreOptions(options: RedisStoreOptions): ResolvedRedisStoreOptions {
  if (typeof options !== 'object' || options === null) {
    throw optionError('Options must be an object: `{ client }` (an ioredis Redis or Cluster) or `{ url }`.');
  }
  const unknown = Object.keys(options).filter((name) => !KNOWN.has(name));
  // A misspelt option (`keyPrefix`, ioredis's own name) would silently keep the default.
  if (unknown.length > 0) console.warn(`[idemkit] [redis] Unknown option(s) ignored: ${unknown.join(', ')}.`);
  if (options.client === undefined && options.url === undefined) {
    throw optionError('Missing required option `client` (an ioredis Redis or Cluster) or `url`.');
  }
  if (options.client !== undefined && options.url !== undefined) {
    throw optionError('Give either `client` or `url`, not both.');
  }
  if (options.client !== undefined && typeof (options.client as { defineCommand?: unknown } | null)?.defineCommand !== 'function') {
    throw optionError('Option `client` must be an ioredis Redis or Cluster client (for a URL string, use `url`).');
  }
  if (options.url !== undefined && (typeof options.url !== 'string' || !/^rediss?:\/\//.test(options.url))) {
    throw optionError('Option `url` must be a redis:// or rediss:// URL.');
  }
  const prefix = options.prefix ?? REDIS_STORE_DEFAULTS.prefix;
  if (typeof prefix !== 'string') throw optionError('Option `prefix` must be a string.');
  const leaseGraceMs = options.leaseGraceMs ?? REDIS_STORE_DEFAULTS.leaseGraceMs;
  if (!Number.isInteger(leaseGraceMs) || leaseGraceMs < 0) {
    throw optionError('Option `leaseGraceMs` must be a non-negative integer (milliseconds).');
  }
  const claim = options.claim ?? REDIS_STORE_DEFAULTS.claim;
  if (claim !== 'set' && claim !== 'script') throw optionError("Option `claim` must be 'set' or 'script'.");
  return { prefix, leaseGraceMs, claim };
}
