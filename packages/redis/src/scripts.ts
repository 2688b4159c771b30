/**
 * The Lua scripts behind every store operation. Each one touches exactly one key (`KEYS[1]`), so
 * Redis Cluster routes it to the key's master and the operation is atomic there. Time is always
 * Redis `TIME` (scripts replicate their effects, so a non-deterministic `TIME` before writes is
 * allowed), never the app server's clock.
 *
 * Record layout: one hash per key with fields
 *   fp        fingerprint (absent when fingerprinting is off)
 *   state     'in_progress' | 'completed'
 *   token     lease token (read while in progress; left behind once completed)
 *   lease_exp lease end, epoch ms (likewise)
 *   created   epoch ms
 *   exp       epoch ms after which the record counts as absent (lease end while in progress)
 *   status, headers (JSON array of [name, value]), body (raw bytes) — completed only
 *
 * Key material only ever travels as KEYS/ARGV, never spliced into the script text.
 */

/**
 * Shared prelude: Redis time in epoch ms. Kept to plain statements: everything here runs on every
 * call, so no helper closures and no `redis.replicate_commands()` (effects replication, which
 * `TIME` before a write needs, is the default since Redis 5, the oldest this store supports).
 */
const PRELUDE = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
`;

/** Integers as exact decimal strings (Lua's default number format would print 1.7e+12). */
const INT = (lua: string): string => `string.format('%.0f', ${lua})`;

/**
 * True when token ARGV[1] holds a live lease on KEYS[1]: the guard of complete, renew, release.
 * Only a live lease counts: once it has run out the key is up for takeover, so a late holder is
 * refused even before anyone has taken over (the in-memory store does the same).
 */
const HELD = `
local h = redis.call('HMGET', KEYS[1], 'state', 'token', 'lease_exp')
if not (h[1] == 'in_progress' and h[2] == ARGV[1] and tonumber(h[3]) > now) then return 0 end
`;

/** The fields returned for an existing record, in the order `parseRecord` reads them. */
const RECORD_FIELDS = `'state', 'fp', 'lease_exp', 'created', 'exp', 'status', 'headers', 'body'`;

/**
 * A record counts only while its deadline lies ahead: the lease end while in progress, the TTL
 * end once completed. `r` holds RECORD_FIELDS.
 */
const LIVE = `((r[1] == 'in_progress' and tonumber(r[3]) > now) or (r[1] == 'completed' and tonumber(r[5]) > now))`;

/**
 * begin: KEYS[1] record; ARGV token, leaseMs, graceMs, hasFingerprint ('1'|'0'), fingerprint.
 * Returns {'acquired', tookOver} or {'existing', now, <RECORD_FIELDS>}.
 *
 * In-progress keys live for lease + grace, so an expired lease is still visible here and its
 * takeover is reported (tookOver = 1); past the grace Redis has dropped the key natively and the
 * claim is a plain new one (tookOver = 0).
 */
export const BEGIN = `${PRELUDE}
local key = KEYS[1]
local r = redis.call('HMGET', key, ${RECORD_FIELDS}, 'token')
if r[1] and ${LIVE} then
  -- Our own token: ioredis re-sent this begin after a reconnect and the first send had already
  -- claimed the key. Same claim, so answer the same (else the key would look busy to its owner).
  if r[1] == 'in_progress' and r[9] == ARGV[1] then return {'acquired', 0} end
  return {'existing', now, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]}
end
-- Drop what is left of an expired record (an old body must not survive into the new one).
if r[1] then redis.call('DEL', key) end
local lease = tonumber(ARGV[2])
local lease_exp = ${INT('now + lease')}
if ARGV[4] == '1' then
  redis.call('HSET', key, 'state', 'in_progress', 'token', ARGV[1], 'lease_exp', lease_exp,
    'created', ${INT('now')}, 'exp', lease_exp, 'fp', ARGV[5])
else
  redis.call('HSET', key, 'state', 'in_progress', 'token', ARGV[1], 'lease_exp', lease_exp,
    'created', ${INT('now')}, 'exp', lease_exp)
end
redis.call('PEXPIRE', key, lease + tonumber(ARGV[3]))
if r[1] == 'in_progress' then return {'acquired', 1} end
return {'acquired', 0}
`;

/**
 * complete: KEYS[1] record; ARGV token, ttlMs, status, headersJson, body. Returns 1 or 0.
 * The lease fields stay behind in the completed hash: nothing reads them once the state is
 * 'completed', and deleting them would cost a command on every completion.
 */
export const COMPLETE = `${PRELUDE}${HELD}
local ttl = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'completed', 'exp', ${INT('now + ttl')}, 'status', ARGV[3],
  'headers', ARGV[4], 'body', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
`;

/** release: KEYS[1] record; ARGV token. Deletes the record if the token holds a live lease; returns 1 or 0. */
export const RELEASE = `${PRELUDE}${HELD}
redis.call('DEL', KEYS[1])
return 1
`;

/** renew: KEYS[1] record; ARGV token, leaseMs, graceMs. Returns 1 or 0. */
export const RENEW = `${PRELUDE}${HELD}
local lease = tonumber(ARGV[2])
local lease_exp = ${INT('now + lease')}
redis.call('HSET', KEYS[1], 'lease_exp', lease_exp, 'exp', lease_exp)
redis.call('PEXPIRE', KEYS[1], lease + tonumber(ARGV[3]))
return 1
`;

/** get: KEYS[1] record. Returns {now, <RECORD_FIELDS>} for a live record, else nil. */
export const GET = `${PRELUDE}
local r = redis.call('HMGET', KEYS[1], ${RECORD_FIELDS})
if not (r[1] and ${LIVE}) then return false end
return {now, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]}
`;
