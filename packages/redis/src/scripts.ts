/**
 * The Lua scripts behind every store operation. Each one touches exactly one key (`KEYS[1]`), so
 * Redis Cluster routes it to the key's master and the operation is atomic there. Time is always
 * Redis `TIME` (scripts replicate their effects, so a non-deterministic `TIME` before writes is
 * allowed), never the app server's clock.
 *
 * Record layout: one hash per key with fields
 *   fp        fingerprint (absent when fingerprinting is off)
 *   state     'in_progress' | 'completed'
 *   token     lease token (in progress only)
 *   lease_exp lease end, epoch ms (in progress only)
 *   created   epoch ms
 *   exp       epoch ms after which the record counts as absent (lease end while in progress)
 *   status, headers (JSON array of [name, value]), body (raw bytes) — completed only
 *
 * Key material only ever travels as KEYS/ARGV, never spliced into the script text.
 */

/** Shared prelude: the time helpers and the liveness rule every script applies. */
const PRELUDE = `
-- Redis < 5 replicates scripts verbatim unless asked; from 7.0 this is a harmless no-op.
if redis.replicate_commands then redis.replicate_commands() end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Integers as exact decimal strings (Lua's default number format would print 1.7e+12).
local function int(n)
  return string.format('%.0f', n)
end
-- A record counts only while its deadline (lease end or TTL end) lies ahead.
local function live(state, lease_exp, exp, now)
  if state == 'in_progress' then return tonumber(lease_exp) > now end
  if state == 'completed' then return tonumber(exp) > now end
  return false
end
-- True when token holds a live lease on the record.
local function held(key, token, now)
  local r = redis.call('HMGET', key, 'state', 'token', 'lease_exp')
  return r[1] == 'in_progress' and r[2] == token and tonumber(r[3]) > now
end
`;

/** The fields returned for an existing record, in the order `parseRecord` reads them. */
const RECORD_FIELDS = `'state', 'fp', 'lease_exp', 'created', 'exp', 'status', 'headers', 'body'`;

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
local now = now_ms()
local lease = tonumber(ARGV[2])
local grace = tonumber(ARGV[3])
local r = redis.call('HMGET', key, ${RECORD_FIELDS}, 'token')
if r[1] and live(r[1], r[3], r[5], now) then
  -- Our own token: ioredis re-sent this begin after a reconnect and the first send had already
  -- claimed the key. Same claim, so answer the same (else the key would look busy to its owner).
  if r[1] == 'in_progress' and r[9] == ARGV[1] then return {'acquired', 0} end
  return {'existing', now, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]}
end
local took_over = 0
if r[1] == 'in_progress' then took_over = 1 end
-- Drop what is left of an expired record (an old body must not survive into the new one).
if r[1] then redis.call('DEL', key) end
local lease_exp = int(now + lease)
redis.call('HSET', key, 'state', 'in_progress', 'token', ARGV[1], 'lease_exp', lease_exp,
  'created', int(now), 'exp', lease_exp)
if ARGV[4] == '1' then redis.call('HSET', key, 'fp', ARGV[5]) end
redis.call('PEXPIRE', key, lease + grace)
return {'acquired', took_over}
`;

/**
 * complete: KEYS[1] record; ARGV token, ttlMs, status, headersJson, body. Returns 1 or 0.
 * Only a live lease counts: once it has run out the key is up for takeover, so a late holder is
 * refused even before anyone has taken over (the in-memory store does the same).
 */
export const COMPLETE = `${PRELUDE}
local key = KEYS[1]
local now = now_ms()
if not held(key, ARGV[1], now) then return 0 end
local ttl = tonumber(ARGV[2])
redis.call('HDEL', key, 'token', 'lease_exp')
redis.call('HSET', key, 'state', 'completed', 'exp', int(now + ttl), 'status', ARGV[3],
  'headers', ARGV[4], 'body', ARGV[5])
redis.call('PEXPIRE', key, ttl)
return 1
`;

/** release: KEYS[1] record; ARGV token. Deletes the record if the token holds a live lease; returns 1 or 0. */
export const RELEASE = `${PRELUDE}
local key = KEYS[1]
if not held(key, ARGV[1], now_ms()) then return 0 end
redis.call('DEL', key)
return 1
`;

/** renew: KEYS[1] record; ARGV token, leaseMs, graceMs. Returns 1 or 0. */
export const RENEW = `${PRELUDE}
local key = KEYS[1]
local now = now_ms()
if not held(key, ARGV[1], now) then return 0 end
local lease = tonumber(ARGV[2])
local lease_exp = int(now + lease)
redis.call('HSET', key, 'lease_exp', lease_exp, 'exp', lease_exp)
redis.call('PEXPIRE', key, lease + tonumber(ARGV[3]))
return 1
`;

/** get: KEYS[1] record. Returns {now, <RECORD_FIELDS>} for a live record, else nil. */
export const GET = `${PRELUDE}
local key = KEYS[1]
local r = redis.call('HMGET', key, ${RECORD_FIELDS})
local now = now_ms()
if not (r[1] and live(r[1], r[3], r[5], now)) then return false end
return {now, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]}
`;
