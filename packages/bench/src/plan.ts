import { PROBES, type Framework, type HandlerKind, type Library, type StoreName } from './config.js';

/** A server measured against its framework's bare server. */
export interface Target {
  readonly library: Exclude<Library, 'bare'>;
  readonly store: StoreName;
}

export interface Plan {
  readonly mode: 'quick' | 'full';
  /** Seconds per autocannon run, runs per target and path, warm-up seconds per server. */
  readonly duration: number;
  readonly rounds: number;
  readonly warmup: number;
  readonly connections: number;
  readonly handler: HandlerKind;
  /** idemkit with `localCache` (`--local-cache`). */
  readonly localCache: boolean;
  readonly frameworks: readonly Framework[];
  readonly targets: (framework: Framework) => Target[];
  /** The crash check: one framework, and the libraries × shared stores it kills a server of. */
  readonly crash: { readonly framework: Framework; readonly targets: readonly Target[] } | null;
  /** Store micro-benchmarks, seconds per phase. */
  readonly stores: readonly StoreName[];
  readonly storeSeconds: number;
}

const PEERS: Record<Framework, Array<Exclude<Library, 'bare' | 'idemkit'>>> = {
  express: ['express-idempotency', 'node-idempotency'],
  fastify: ['node-idempotency'],
  koa: [],
};

function targetsFor(stores: readonly StoreName[], peerStores: readonly StoreName[], probes: boolean) {
  return (framework: Framework): Target[] => [
    ...stores.map((store): Target => ({ library: 'idemkit', store })),
    ...PEERS[framework].flatMap((library) =>
      // express-idempotency ships only its in-memory adapter.
      (library === 'express-idempotency' ? ['memory' as const] : peerStores).map((store): Target => ({ library, store })),
    ),
    // Express and Fastify, where the targets are; their probe keeps answers in memory.
    ...(probes && framework !== 'koa' ? PROBES.map((library): Target => ({ library, store: 'memory' })) : []),
  ];
}

export type Skippable = 'http' | 'stores' | 'peers' | 'crash';

/**
 * The crash check runs on Fastify (else the first framework asked for) for idemkit on every
 * shared store of the HTTP table, and for @node-idempotency/core on Redis, its shared adapter. A
 * memory store dies with its process, so there is nothing to check there.
 */
function crashPlan(frameworks: readonly Framework[], stores: readonly StoreName[], peers: boolean): Plan['crash'] {
  const framework = frameworks.includes('fastify') ? 'fastify' : frameworks[0];
  if (framework === undefined) return null;
  const shared = stores.filter((s) => s !== 'memory' && s !== 'redis-cluster');
  const targets: Target[] = [
    ...shared.map((store): Target => ({ library: 'idemkit', store })),
    ...(peers && framework !== 'koa' && shared.includes('redis') ? [{ library: 'node-idempotency', store: 'redis' } as const] : []),
  ];
  return targets.length > 0 ? { framework, targets } : null;
}

export interface Args {
  readonly quick: boolean;
  readonly duration?: number;
  readonly rounds?: number;
  readonly connections?: number;
  readonly handler?: HandlerKind;
  readonly frameworks?: Framework[];
  readonly stores?: StoreName[];
  readonly skip: ReadonlySet<Skippable>;
  /** Add the probes (see `apps/probes.ts`) to the Express and Fastify tables. */
  readonly probes?: boolean;
  /** Run idemkit with `localCache: true`. */
  readonly localCache?: boolean;
}

/**
 * --quick: Express and Fastify over memory and Redis, peers on memory, 1.5 s runs, one round
 * (under 2 minutes on 2 cores). Full: three frameworks over four stores, peers on memory and
 * Redis, two rounds (the second in reverse order) of 3 s runs.
 */
export function makePlan(args: Args): Plan {
  const quick = args.quick;
  const stores = args.stores ?? (quick ? ['memory', 'redis'] : ['memory', 'redis', 'postgres', 'mongodb']);
  const peerStores: StoreName[] = args.skip.has('peers') ? [] : quick ? ['memory'] : ['memory', 'redis'];
  const targets = targetsFor(
    stores.filter((s) => s !== 'redis-cluster'),
    peerStores.filter((s) => stores.includes(s)),
    args.probes === true,
  );
  const asked: Framework[] = args.frameworks ?? (quick ? ['express', 'fastify'] : ['express', 'fastify', 'koa']);
  const frameworks = args.skip.has('http') ? [] : asked;
  return {
    mode: quick ? 'quick' : 'full',
    duration: args.duration ?? (quick ? 1.5 : 3),
    rounds: args.rounds ?? (quick ? 1 : 2),
    warmup: quick ? 0.5 : 2,
    connections: args.connections ?? 10,
    handler: args.handler ?? 'hello',
    localCache: args.localCache === true,
    frameworks,
    targets: args.skip.has('peers') ? (f) => targets(f).filter((t) => t.library !== 'express-idempotency' && t.library !== 'node-idempotency') : targets,
    crash: args.skip.has('crash') ? null : crashPlan(asked, stores, !args.skip.has('peers')),
    stores: args.skip.has('stores') ? [] : ['memory', 'postgres', 'redis', 'redis-cluster', 'mongodb'],
    storeSeconds: quick ? 0.5 : 4,
  };
}

const FRAMEWORKS: readonly Framework[] = ['express', 'fastify', 'koa'];
const STORES: readonly StoreName[] = ['memory', 'postgres', 'redis', 'redis-cluster', 'mongodb'];

function list<T extends string>(value: string, allowed: readonly T[], flag: string): T[] {
  const items = value.split(',').map((s) => s.trim()).filter(Boolean);
  for (const item of items) if (!allowed.includes(item as T)) throw new Error(`${flag}: unknown "${item}" (one of ${allowed.join(', ')})`);
  return items as T[];
}

export const USAGE = `pnpm bench [--quick] [--duration=S] [--rounds=N] [--connections=N]
           [--frameworks=express,fastify,koa] [--stores=memory,redis,postgres,mongodb]
           [--skip=http,stores,peers,crash] [--handler=hello|postgres] [--probes] [--local-cache]`;

export function parseArgs(argv: readonly string[]): Args {
  let quick = false;
  const out: { -readonly [K in keyof Args]?: Args[K] } = {};
  const skip = new Set<Skippable>();
  for (const arg of argv) {
    if (arg === '--') continue;
    const [flag, value = ''] = arg.split('=', 2) as [string, string?];
    const number = (): number => {
      const n = Number(value);
      if (!(n > 0)) throw new Error(`${flag} needs a positive number`);
      return n;
    };
    switch (flag) {
      case '--quick':
        quick = true;
        break;
      case '--probes':
        out.probes = true;
        break;
      case '--local-cache':
        out.localCache = true;
        break;
      case '--duration':
        out.duration = number();
        break;
      case '--rounds':
        out.rounds = Math.round(number());
        break;
      case '--connections':
        out.connections = Math.round(number());
        break;
      case '--frameworks':
        out.frameworks = list(value, FRAMEWORKS, flag);
        break;
      case '--stores':
        out.stores = list(value, STORES, flag);
        break;
      case '--handler': {
        const [handler] = list(value, ['hello', 'postgres'] as const, flag);
        if (handler === undefined) throw new Error(`${flag} needs hello or postgres`);
        out.handler = handler;
        break;
      }
      case '--skip':
        for (const s of list(value, ['http', 'stores', 'peers', 'crash'] as const, flag)) skip.add(s);
        break;
      default:
        throw new Error(`unknown argument ${arg}\nusage: ${USAGE}`);
    }
  }
  return { ...out, quick, skip };
}
