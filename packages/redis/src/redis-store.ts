import { randomUUID } from 'node:crypto';
import { Redis } from 'ioredis';
import type {
  BeginResult,
  IdempotencyRecord,
  IdempotencyStore,
  LeaseToken,
  StoredResponse,
} from '@idemkit/core';
import { resolveRedisStoreOptions, type RedisClient, type RedisStoreOptions } from './options.js';
import { claimValue, decodeRecord, isCompleted, unexpected } from './record.js';
import { BEGIN, COMPLETE, COMPLETE_STAGED, GET, RELEASE, RENEW, STAGE } from './scripts.js';
import { writeBatcher } from './write-batch.js';

/**
 * What a `...Buffer` script call resolves to: bulk strings as Buffers, integers as numbers, or
 * as strings on a client created with ioredis's `stringNumbers: true`.
 */
type Reply = Buffer | number | string | null | Reply[];
type ScriptCall = (...keysThenArgs: Array<string | number | Buffer>) => Promise<Reply>;

/**
 * Command names defined on the client. The version suffix keeps a future script change from
 * colliding with an older idemkit defining the same name on a shared client.
 */
const COMMANDS = {
  begin: { name: 'idemkitBeginV3', lua: BEGIN, keys: 1 },
  complete: { name: 'idemkitCompleteV3', lua: COMPLETE, keys: 1 },
  release: { name: 'idemkitReleaseV2', lua: RELEASE, keys: 1 },
  renew: { name: 'idemkitRenewV2', lua: RENEW, keys: 1 },
  get: { name: 'idemkitGetV2', lua: GET, keys: 1 },
  stage: { name: 'idemkitStageV2', lua: STAGE, keys: 1 },
  completeStaged: { name: 'idemkitCompleteStagedV2', lua: COMPLETE_STAGED, keys: 2 },
} as const;

type Op = keyof typeof COMMANDS;
type KeyOp = Exclude<Op, 'stage' | 'completeStaged'>;

/**
 * A body larger than this is uploaded in chunks of this size (see `completeInChunks`), in bytes.
 * ioredis's `socketTimeout` runs from a command's write to the first byte of any answer, and Redis
 * answers nothing while it reads one command: sent whole, a body that takes longer than the
 * timeout to upload had its connection dropped and was re-sent on the next, for good, failing
 * every other command with it. Each chunk is answered on its own, so only a chunk must make it in
 * time (256 KiB in 5 s: 52 kB/s).
 */
const CHUNK_BYTES = 256 * 1024;
/** How long an upload key outlives its latest chunk, in ms (an abandoned upload expires). */
const UPLOAD_TTL_MS = 60_000;

/** The client created from `url` drops a connection that has not answered for this long, in ms. */
const URL_CLIENT_SOCKET_TIMEOUT_MS = 5_000;

/** When a lost claim's release is sent again after the first (see `giveBack`), in ms. */
const GIVE_BACK_MS: readonly number[] = [250, 1_000, 3_000];
/** Then, while the release keeps failing, how often. */
const GIVE_BACK_EVERY_MS = 5_000;
/**
 * How long `close()` lets an owned client's QUIT take before it drops the socket: QUIT is answered
 * after the commands sent before it, a completion among them, which a Redis paused for a moment
 * (a failover's `CLIENT PAUSE`) still runs; as long as the socket timeout, past which the
 * connection would be dropped anyway.
 */
const QUIT_WAIT_MS = URL_CLIENT_SOCKET_TIMEOUT_MS;
/** `SET` refused outright (see `setClaim`): the begin script is asked instead. */
const REFUSED = Symbol('refused');
/**
 * The errors of a Redis that refuses every write command before it looks at the key: at
 * `maxmemory` with `noeviction` (OOM), short of `min-replicas-to-write` (NOREPLICAS), unable to
 * persist (MISCONF: a failed RDB save, an AOF write error), a replica (READONLY: a master demoted
 * by a failover keeps the connections it had open, and serves reads on them).
 */
const WRITES_REFUSED = /^(OOM|NOREPLICAS|MISCONF|READONLY) /;

/** The Redis store: a {@link IdempotencyStore} whose records live in Redis or Redis Cluster. */
export interface RedisStore extends IdempotencyStore {
  /** The ioredis client in use (yours, or the one created from `url`). */
  readonly client: RedisClient;
  /** The key prefix in use. */
  readonly prefix: string;
  /**
   * Always resolves 0 without touching Redis: every record carries an expiry (lease + grace while
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
 * Create a store on ioredis (single node or Cluster). Each operation is one command on one key:
 * atomic, one round trip, timed by the Redis clock. `begin` is a plain `SET … NX GET` (a script
 * follows only when it meets a request still in flight); the fenced writes are Lua scripts.
 * Commands sent in one event-loop turn share one socket write (see `write-batch.ts`).
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
  const { prefix, leaseGraceMs, claim } = resolveRedisStoreOptions(options);
  const owned = options.client === undefined;
  // A socket timeout: on a connection that went silent (a network black hole) ioredis otherwise
  // waits for its answers for good, and every command queued behind them with it.
  // And a new connection on READONLY: see `reconnectOnReadonly`.
  const client: RedisClient =
    options.client ??
    reportingErrors(new Redis(options.url as string, { socketTimeout: URL_CLIENT_SOCKET_TIMEOUT_MS, reconnectOnError: reconnectOnReadonly }));
  const calls = defineCommands(client);
  // ioredis's own prefix, which it puts in front of both keys of the chunked completion.
  const keyPrefix = clientKeyPrefix(client);
  const batch = writeBatcher(client);
  let closed = false;

  /**
   * Release a claim its caller never learnt of, fenced by its token (harmless if nothing landed).
   * Once is not enough: on a Cluster, ioredis sends a command parked for a failover delay even
   * after its `commandTimeout` rejected it, so the claim can land after a first release; and
   * with `maxRetriesPerRequest: 0` a reconnect that fails again drops a queued release unsent.
   * A Cluster may even send the claim twice (the parked copy and a MOVED redirect's), after a
   * release that deleted the first. So it is sent again a few times whatever the answers, then
   * for as long as it cannot reach Redis (a timeout is no such failure: it was sent), while the
   * claim's lease runs (`leaseMs` from now at most: after it a release is refused anyway, and the
   * key is free to take over).
   */
  function giveBack(key: string, token: string, leaseMs: number): void {
    const until = Date.now() + leaseMs;
    let attempt = 0;
    const send = (): void => {
      if (closed) return;
      run('release', key, token).then(
        () => next(false),
        (error: unknown) => next(!isTimeout(error)),
      );
    };
    const next = (failed: boolean): void => {
      const wait = GIVE_BACK_MS[attempt++] ?? (failed ? GIVE_BACK_EVERY_MS : undefined);
      if (wait === undefined || Date.now() + wait > until) return;
      setTimeout(send, wait).unref();
    };
    send();
  }

  /**
   * The claim as one `SET … NX GET`: null when it claimed the key, else the record there. A Redis
   * that refuses writes (at `maxmemory` with `noeviction`, short of `min-replicas-to-write`,
   * unable to persist, a replica) refuses every SET before it looks at the key, one that would
   * only have read included; scripts are refused only when they write, so the begin script still answers a
   * replay or a key in flight then (and refuses a new key, as it must).
   */
  async function setClaim(key: string, token: string, lease: number, fingerprint: string | null): Promise<Buffer | null | typeof REFUSED> {
    try {
      return (await client.setBuffer(prefix + key, claimValue(leaseGraceMs, lease, token, fingerprint), 'PX', lease + leaseGraceMs, 'NX', 'GET')) as Buffer | null;
    } catch (error) {
      if (error instanceof Error && WRITES_REFUSED.test(error.message)) return REFUSED;
      throw error;
    }
  }

  /**
   * A single-node client on a Cluster node gets `MOVED` for every key another node serves (most
   * of them), which would surface as 503s with a bare "MOVED 1234 host:port": say what to change.
   */
  function explained(error: Error): Error {
    if (client.isCluster) return error;
    return new Error(
      `[idemkit] [redis] This Redis is part of a Cluster, but the store was given a single-node client (\`new Redis(…)\`), which cannot follow its redirections (${error.message}). Give the store an ioredis \`Cluster\` (\`new Cluster([{ host, port }, …])\`).`,
      { cause: error },
    );
  }

  function run(op: KeyOp, key: string, ...args: Array<string | number | Buffer>): Promise<Reply> {
    if (closed) return Promise.reject(closedError());
    batch();
    return calls[op](prefix + key, ...args);
  }

  /**
   * complete for a body over `CHUNK_BYTES`, when an upload key in the record's slot exists (see
   * `uploadKey`): the chunks, then the completion that takes them, all sent at once (one round
   * trip's latency, several answers). Costs nothing for smaller bodies.
   */
  async function completeInChunks(record: string, upload: string, fields: Array<string | number>, body: Buffer): Promise<Reply> {
    if (closed) throw closedError();
    batch();
    const sent: Array<Promise<Reply>> = [];
    for (let at = 0; at < body.byteLength; at += CHUNK_BYTES) {
      sent.push(calls.stage(upload, at, body.subarray(at, at + CHUNK_BYTES), UPLOAD_TTL_MS));
    }
    sent.push(calls.completeStaged(record, upload, ...fields, body.byteLength));
    const replies = await Promise.all(sent);
    return replies[replies.length - 1] ?? null;
  }

  return {
    shared: true,
    client,
    prefix,

    async begin(key, fingerprint, leaseMs): Promise<BeginResult> {
      const token = randomUUID() as LeaseToken;
      const lease = positiveMs(leaseMs, 'leaseMs');
      try {
        if (claim === 'set') {
          if (closed) throw closedError();
          batch();
          // The hot path is one plain command, no script: it claims a free key, or hands back the
          // record already there (a replay needs nothing more).
          const found = await setClaim(key, token, lease, fingerprint);
          if (found === null) return { kind: 'acquired', token, tookOver: false };
          if (found !== REFUSED && isCompleted(found)) return { kind: 'existing', record: decodeRecord(key, found, 0), leaseRemainingMs: 0 };
        }
        // The begin script does it all atomically by the Redis clock. After a SET it runs only on a
        // record in progress, whose lease only a script can read and take over if it has run out:
        // a second round trip, on this contended path only. That includes our own token (ioredis
        // re-sent this SET after a reconnect and the first send had claimed the key): the script
        // answers 'acquired' only while that claim's lease is still running, and claims the key
        // afresh if it ran out meanwhile, so a re-send never hands back a lease that is over.
        const reply = asArray(
          await run('begin', key, token, lease, leaseGraceMs, fingerprint === null ? '0' : '1', fingerprint ?? ''),
        );
        if (text(reply[0]) === 'acquired') return { kind: 'acquired', token, tookOver: isOne(reply[1]) };
        const now = num(reply[1]);
        const record = decodeRecord(key, bytes(reply[3]), num(reply[2]));
        const leaseRemainingMs = record.leaseExpiresAt === null ? 0 : Math.max(0, record.leaseExpiresAt - now);
        return { kind: 'existing', record, leaseRemainingMs };
      } catch (error) {
        // The claim may have landed though the answer was lost (ioredis's `commandTimeout`, or
        // `maxRetriesPerRequest` used up by a reconnect): the caller was told the store failed,
        // so the key must not stay claimed, answering 409 to its retries, for a whole lease.
        // Refused by a Cluster node for another's key (a single-node client): nothing landed.
        // Explained here only: every request begins, so the first call on a key says it, and the
        // other operations on the hot path pay nothing for it.
        if (isRedirect(error)) throw explained(error);
        if (!neverSent(error)) giveBack(key, token, lease);
        throw error;
      }
    },

    async complete(key, token, response: StoredResponse, ttlMs): Promise<boolean> {
      const ttl = positiveMs(ttlMs, 'ttlMs');
      const headers = JSON.stringify(response.headers);
      // A view, not a copy: ioredis writes Buffers to the socket as raw bytes.
      const body = Buffer.from(response.body.buffer, response.body.byteOffset, response.body.byteLength);
      const upload = body.byteLength > CHUNK_BYTES ? uploadKey(client.isCluster, keyPrefix, prefix, key) : null;
      if (upload !== null) return isOne(await completeInChunks(prefix + key, upload, [token, ttl, response.status, headers], body));
      return isOne(await run('complete', key, token, ttl, response.status, headers, body));
    },

    async release(key, token): Promise<boolean> {
      return isOne(await run('release', key, token));
    },

    async renew(key, token, leaseMs): Promise<boolean> {
      return isOne(await run('renew', key, token, positiveMs(leaseMs, 'leaseMs'), leaseGraceMs));
    },

    async get(key): Promise<IdempotencyRecord | undefined> {
      const reply = await run('get', key);
      if (reply === null) return undefined;
      const [, leaseEnd, value] = asArray(reply);
      return decodeRecord(key, bytes(value), num(leaseEnd));
    },

    async purgeExpired(): Promise<number> {
      if (closed) throw closedError();
      return 0;
    },

    async close(): Promise<void> {
      if (closed) return;
      closed = true;
      // Only a client we created is ours to quit; a caller's client stays connected.
      if (!owned) return;
      // quit() waits behind the commands queued for a Redis that is away (a request in flight, a
      // claim being given back), then rejects and leaves the client reconnecting, which keeps the
      // process alive: while not connected, or if quitting takes long, the socket is just dropped.
      if (client.status === 'ready') {
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([client.quit().catch(() => undefined), new Promise((resolve) => (timer = setTimeout(resolve, QUIT_WAIT_MS)))]);
        clearTimeout(timer);
      }
      client.disconnect();
    },
  };
}

/**
 * A failover behind one address (a cloud primary endpoint whose DNS name moves to the promoted
 * replica, a manual `REPLICAOF`) turns the old master into a replica that keeps its client
 * connections open and answers every write on them with READONLY: without a new connection every
 * `begin` and `complete` would fail until the process restarted. So the client created from `url`
 * reconnects on READONLY (ioredis's documented recipe), resolving the address again. The command
 * that met it still fails (a 503, which the client retries), rather than being re-sent: re-sent,
 * it would wait for good, with every later one, while the URL keeps leading to a replica (a
 * replica's URL given by mistake). Read only on error replies: nothing on the hot path.
 */
function reconnectOnReadonly(error: Error): 1 | false {
  return error.message.startsWith('READONLY') ? 1 : false;
}

/**
 * A client with no 'error' listener makes ioredis print "[ioredis] Unhandled error event" with a
 * stack on every failed reconnect: dozens of lines a minute while Redis is down. Yours is yours
 * to listen to; the one created from `url` says it once per outage. Store calls fail meanwhile
 * (the engine answers 503 and reports `store-error`), so nothing is hidden.
 */
function reportingErrors(client: Redis): Redis {
  let reported = false;
  client.on('error', (error: Error) => {
    if (reported) return;
    reported = true;
    console.warn(`[idemkit] [redis] ${error.message}: ioredis keeps reconnecting, and store calls fail until it is connected again (not logged again until then).`);
  });
  client.on('ready', () => (reported = false));
  return client;
}

function defineCommands(client: RedisClient): Record<Op, ScriptCall> {
  const target = client as unknown as Record<string, ScriptCall | undefined>;
  const out = {} as Record<Op, ScriptCall>;
  for (const op of Object.keys(COMMANDS) as Op[]) {
    const { name, lua, keys } = COMMANDS[op];
    // Several stores may share one client; the scripts are identical, so define once.
    if (typeof target[`${name}Buffer`] !== 'function') {
      client.defineCommand(name, { numberOfKeys: keys, lua });
    }
    const fn = target[`${name}Buffer`] as ScriptCall;
    out[op] = (...keysThenArgs) => fn.call(client, ...keysThenArgs);
  }
  return out;
}

/**
 * The `keyPrefix` option of an ioredis client ('' when none), as the string whose UTF-8 bytes
 * ioredis puts in front of every key. ioredis also takes a Buffer, sent byte for byte: null when
 * those bytes are not UTF-8, since no string we send could repeat them inside a hash tag.
 */
export function clientKeyPrefix(client: Pick<RedisClient, 'options'>): string | null {
  const keyPrefix = (client.options as { keyPrefix?: unknown }).keyPrefix;
  if (typeof keyPrefix === 'string') return keyPrefix;
  if (!Buffer.isBuffer(keyPrefix)) return '';
  const text = keyPrefix.toString('utf8');
  return Buffer.from(text, 'utf8').equals(keyPrefix) ? text : null;
}

/**
 * A fresh upload key, under `prefix`, that hashes to the same Cluster slot as the record
 * `prefix + key`, so the chunked completion may name both. ioredis puts `keyPrefix` in front of
 * each; Redis hashes the first `{tag}` with something inside, else the whole key. A record whose
 * name has such a tag keeps it when suffixed; one without gets its whole name as the upload key's
 * tag, possible only when no `}` would cut that tag short and no `{` comes before it. Otherwise
 * null: the body goes in one command, as before; also for a Buffer `keyPrefix` that is not UTF-8.
 * A single node has no slots: any key does.
 */
export function uploadKey(cluster: boolean, keyPrefix: string | null, prefix: string, key: string): string | null {
  const suffix = `:upload:${randomUUID()}`;
  if (!cluster) return prefix + key + suffix;
  if (keyPrefix === null) return null;
  const whole = keyPrefix + prefix + key;
  const open = whole.indexOf('{');
  if (open !== -1 && whole.indexOf('}', open + 1) > open + 1) return prefix + key + suffix;
  if (whole.includes('}') || (keyPrefix + prefix).includes('{')) return null;
  return `${prefix}{${whole}}${suffix}`;
}

/**
 * ioredis refused the command before writing it: not connected, with `enableOfflineQueue: false`.
 * Nothing can have landed, so there is no claim to give back; sending releases anyway made each
 * failed request of an outage schedule a dozen more commands that fail the same way.
 */
function neverSent(error: unknown): boolean {
  return error instanceof Error && /^(Stream|Cluster) isn't (writeable|ready) and enableOfflineQueue options is false$/.test(error.message);
}

/** A Cluster node's redirection (`MOVED`/`ASK`), which a single-node client cannot follow. */
function isRedirect(error: unknown): error is Error {
  return error instanceof Error && /^(MOVED|ASK) /.test(error.message);
}

/** ioredis's `commandTimeout` rejection: the command was written, it may well have run. */
function isTimeout(error: unknown): boolean {
  return error instanceof Error && /timed out/i.test(error.message);
}

function positiveMs(ms: number, name: string): number {
  if (!Number.isFinite(ms) || ms <= 0) {
    throw new RangeError(`[idemkit] [redis] \`${name}\` must be a positive number of milliseconds.`);
  }
  return Math.ceil(ms);
}

function asArray(reply: Reply): Reply[] {
  if (!Array.isArray(reply)) throw unexpected();
  return reply;
}

/** A script's integer 1 (the `stringNumbers` client answers '1'). */
function isOne(v: Reply | undefined): boolean {
  return v === 1 || v === '1';
}

function text(v: Reply | undefined): string {
  if (Buffer.isBuffer(v)) return v.toString('utf8');
  if (typeof v === 'number' || typeof v === 'string') return String(v);
  throw unexpected();
}

function num(v: Reply | undefined): number {
  const n = typeof v === 'number' ? v : Number(text(v));
  if (!Number.isFinite(n)) throw unexpected();
  return n;
}

function bytes(v: Reply | undefined): Buffer {
  if (!Buffer.isBuffer(v)) throw unexpected();
  return v;
}

function closedError(): Error {
  return new Error('[idemkit] [redis] The store is closed.');
}
