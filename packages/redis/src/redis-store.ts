import { randomUUID } from 'node:crypto';
import { Redis } from 'ioredis';
import type {
  BeginResult,
  IdempotencyRecord,
  IdempotencyStore,
  LeaseToken,
  RecordState,
  StoredResponse,
} from '@idemkit/core';
import { resolveRedisStoreOptions, type RedisClient, type RedisStoreOptions } from './options.js';
import { BEGIN, COMPLETE, GET, RELEASE, RENEW } from './scripts.js';
import { writeBatcher } from './write-batch.js';

/** What a `...Buffer` script call resolves to: bulk strings as Buffers, integers as numbers. */
type Reply = Buffer | number | null | Reply[];
type ScriptCall = (key: string, ...args: Array<string | number | Buffer>) => Promise<Reply>;

/**
 * Command names defined on the client. The version suffix keeps a future script change from
 * colliding with an older idemkit defining the same name on a shared client.
 */
const COMMANDS = {
  begin: { name: 'idemkitBeginV1', lua: BEGIN },
  complete: { name: 'idemkitCompleteV1', lua: COMPLETE },
  release: { name: 'idemkitReleaseV1', lua: RELEASE },
  renew: { name: 'idemkitRenewV1', lua: RENEW },
  get: { name: 'idemkitGetV1', lua: GET },
} as const;

type Op = keyof typeof COMMANDS;

/** The Redis store: a {@link IdempotencyStore} whose records live in Redis or Redis Cluster. */
export interface RedisStore extends IdempotencyStore {
  /** The ioredis client in use (yours, or the one created from `url`). */
  readonly client: RedisClient;
  /** The key prefix in use. */
  readonly prefix: string;
  /**
   * Always resolves 0 without touching Redis: every record carries a PEXPIRE (lease + grace while
   * in progress, the TTL once completed), so Redis deletes expired records by itself and there is
   * nothing to sweep. Running a purger against this store is harmless and unnecessary.
   */
  purgeExpired(limit?: number): Promise<number>;
  /**
   * Mark the store closed (later calls reject). Quits the client only if the store created it
   * from `url`; a client you passed stays connected. Safe to call twice.
   */
  close(): Promise<void>;
}

/**
 * Create a store on ioredis (single node or Cluster). Each operation is one Lua script on one
 * key: one round trip, atomic, timed by Redis `TIME`. Commands sent in one event-loop turn share
 * one socket write (see `write-batch.ts`).
 *
 * @example
 * ```ts
 * import { Redis } from 'ioredis';
 * import { createRedisStore } from '@idemkit/redis';
 *
 * const redis = new Redis('redis://127.0.0.1:6379');
 * const store = createRedisStore({ client: redis });
 * ```
 */
export function createRedisStore(options: RedisStoreOptions): RedisStore {
  const { prefix, leaseGraceMs } = resolveRedisStoreOptions(options);
  const owned = options.client === undefined;
  const client: RedisClient = options.client ?? new Redis(options.url as string);
  const calls = defineCommands(client);
  const batch = writeBatcher(client);
  let closed = false;

  function run(op: Op, key: string, ...args: Array<string | number | Buffer>): Promise<Reply> {
    if (closed) return Promise.reject(new Error('[idemkit] [redis] The store is closed.'));
    batch();
    return calls[op](prefix + key, ...args);
  }

  return {
    shared: true,
    client,
    prefix,

    async begin(key, fingerprint, leaseMs): Promise<BeginResult> {
      const token = randomUUID() as LeaseToken;
      const reply = await run(
        'begin',
        key,
        token,
        positiveMs(leaseMs, 'leaseMs'),
        leaseGraceMs,
        fingerprint === null ? '0' : '1',
        fingerprint ?? '',
      );
      const parts = asArray(reply);
      if (text(parts[0]) === 'acquired') return { kind: 'acquired', token, tookOver: parts[1] === 1 };
      const now = num(parts[1]);
      const record = parseRecord(key, parts.slice(2));
      const leaseRemainingMs =
        record.leaseExpiresAt === null ? 0 : Math.max(0, record.leaseExpiresAt - now);
      return { kind: 'existing', record, leaseRemainingMs };
    },

    async complete(key, token, response: StoredResponse, ttlMs): Promise<boolean> {
      const reply = await run(
        'complete',
        key,
        token,
        positiveMs(ttlMs, 'ttlMs'),
        response.status,
        JSON.stringify(response.headers),
        // A view, not a copy: ioredis writes Buffers to the socket as raw bytes.
        Buffer.from(response.body.buffer, response.body.byteOffset, response.body.byteLength),
      );
      return reply === 1;
    },

    async release(key, token): Promise<boolean> {
      return (await run('release', key, token)) === 1;
    },

    async renew(key, token, leaseMs): Promise<boolean> {
      return (await run('renew', key, token, positiveMs(leaseMs, 'leaseMs'), leaseGraceMs)) === 1;
    },

    async get(key): Promise<IdempotencyRecord | undefined> {
      const reply = await run('get', key);
      if (reply === null) return undefined;
      return parseRecord(key, asArray(reply).slice(1));
    },

    async purgeExpired(): Promise<number> {
      if (closed) throw new Error('[idemkit] [redis] The store is closed.');
      return 0;
    },

    async close(): Promise<void> {
      if (closed) return;
      closed = true;
      // Only a client we created is ours to quit; a caller's client stays connected.
      if (owned) await client.quit();
    },
  };
}

function defineCommands(client: RedisClient): Record<Op, ScriptCall> {
  const target = client as unknown as Record<string, ScriptCall | undefined>;
  const out = {} as Record<Op, ScriptCall>;
  for (const op of Object.keys(COMMANDS) as Op[]) {
    const { name, lua } = COMMANDS[op];
    // Several stores may share one client; the scripts are identical, so define once.
    if (typeof target[`${name}Buffer`] !== 'function') {
      client.defineCommand(name, { numberOfKeys: 1, lua });
    }
    const fn = target[`${name}Buffer`] as ScriptCall;
    out[op] = (key, ...args) => fn.call(client, key, ...args);
  }
  return out;
}

function positiveMs(ms: number, name: string): number {
  if (!Number.isFinite(ms) || ms <= 0) {
    throw new RangeError(`[idemkit] [redis] \`${name}\` must be a positive number of milliseconds.`);
  }
  return Math.ceil(ms);
}

/** Fields in the order of `RECORD_FIELDS` in scripts.ts. */
function parseRecord(key: string, f: Reply[]): IdempotencyRecord {
  const [state, fp, leaseExp, created, exp, status, headers, body] = f;
  const s = text(state) as RecordState;
  const response: StoredResponse | null =
    s === 'completed'
      ? {
          status: num(status),
          headers: JSON.parse(text(headers)) as Array<[string, string]>,
          body: toBytes(body),
        }
      : null;
  return {
    key,
    fingerprint: fp === null || fp === undefined ? null : text(fp),
    state: s,
    leaseExpiresAt: s === 'in_progress' ? num(leaseExp) : null,
    response,
    createdAt: num(created),
    expiresAt: num(exp),
  };
}

function asArray(reply: Reply): Reply[] {
  if (!Array.isArray(reply)) throw new Error('[idemkit] [redis] Unexpected script reply.');
  return reply;
}

function text(v: Reply | undefined): string {
  if (Buffer.isBuffer(v)) return v.toString('utf8');
  if (typeof v === 'number') return String(v);
  throw new Error('[idemkit] [redis] Unexpected script reply.');
}

function num(v: Reply | undefined): number {
  const n = typeof v === 'number' ? v : Number(text(v));
  if (!Number.isFinite(n)) throw new Error('[idemkit] [redis] Unexpected script reply.');
  return n;
}

/** A plain Uint8Array copy, so callers never hold a slice of ioredis's pooled reply buffer. */
function toBytes(v: Reply | undefined): Uint8Array {
  if (v === null || v === undefined) return new Uint8Array(0);
  if (!Buffer.isBuffer(v)) throw new Error('[idemkit] [redis] Unexpected script reply.');
  return new Uint8Array(v);
}
