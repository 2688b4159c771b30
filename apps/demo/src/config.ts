/** Demo settings from the environment; unknown values are refused with a message that says what is allowed. */
export const FRAMEWORKS = ['fastify', 'express', 'koa'] as const;
export const STORES = ['memory', 'postgres', 'redis', 'mongodb'] as const;

export type Framework = (typeof FRAMEWORKS)[number];
export type StoreKind = (typeof STORES)[number];

export interface DemoConfig {
  readonly port: number;
  readonly host: string;
  readonly framework: Framework;
  readonly store: StoreKind;
  /** Connection string of the chosen store (not needed for memory). */
  readonly url: string | undefined;
  /** How long the simulated payment call takes, in ms. */
  readonly workMs: number;
  /** Prefix of every table, key and collection the demo writes, so several demos can share a server. */
  readonly namespace: string;
}

export class DemoConfigError extends Error {
  override readonly name = 'DemoConfigError';
}

/** The variable that holds each store's connection string. */
export const URL_VARIABLE: Record<Exclude<StoreKind, 'memory'>, string> = {
  postgres: 'DATABASE_URL',
  redis: 'REDIS_URL',
  mongodb: 'MONGODB_URL',
};

/** The longest delay setTimeout keeps; a longer one fires after 1 ms. */
const MAX_TIMER_MS = 2_147_483_647;

function pick<T extends string>(name: string, value: string | undefined, allowed: readonly T[]): T {
  const v = (value ?? allowed[0]!).trim().toLowerCase();
  if (!(allowed as readonly string[]).includes(v)) {
    throw new DemoConfigError(`${name}=${value} is not supported. Use one of: ${allowed.join(', ')}.`);
  }
  return v as T;
}

function integer(name: string, value: string | undefined, fallback: number, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (value === undefined || value === '') return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < min || n > max) {
    throw new DemoConfigError(`${name}=${value} must be an integer >= ${min}${max < Number.MAX_SAFE_INTEGER ? ` and <= ${max}` : ''}.`);
  }
  return n;
}

export function readConfig(env: NodeJS.ProcessEnv = process.env): DemoConfig {
  const store = pick('STORE', env.STORE, STORES);
  const framework = pick('FRAMEWORK', env.FRAMEWORK, FRAMEWORKS);
  let url: string | undefined;
  if (store !== 'memory') {
    const variable = URL_VARIABLE[store];
    url = env[variable];
    if (!url) throw new DemoConfigError(`STORE=${store} needs ${variable} (e.g. ${variable}=${example(store)}).`);
  }
  const namespace = env.DEMO_NAMESPACE ?? 'demo';
  if (!/^[a-z][a-z0-9_]{0,30}$/.test(namespace)) throw new DemoConfigError('DEMO_NAMESPACE must be lower-case letters, digits and _ (max 31).');
  return {
    port: integer('PORT', env.PORT, 3000, 0, 65_535),
    // Empty means unset, as for PORT: an empty HOST would listen on every interface.
    host: env.HOST || '127.0.0.1',
    framework,
    store,
    url,
    // setTimeout holds at most 2^31 - 1 ms: a longer wait would fire after 1 ms instead.
    workMs: integer('DEMO_WORK_MS', env.DEMO_WORK_MS, 50, 0, MAX_TIMER_MS),
    namespace,
  };
}

function example(store: Exclude<StoreKind, 'memory'>): string {
  return { postgres: 'postgres://postgres@127.0.0.1:5432/test', redis: 'redis://127.0.0.1:6379', mongodb: 'mongodb://127.0.0.1:27017/demo' }[store];
}
