/**
 * The Lua scripts behind the store's fenced operations. Each one touches exactly one key
 * (`KEYS[1]`), so Redis Cluster routes it to the key's master and the operation is atomic there;
 * `COMPLETE_STAGED` also names a large body's upload key, built to hash to the same slot.
 * Time is always Redis time (`TIME`, `PEXPIRETIME`), never the app server's clock. The hot path
 * of `begin` is no script at all (see `record.ts` and `begin` in `redis-store.ts`).
 *
 * Record layout (`record.ts` encodes and decodes it in JS): one string per key,
 *   in progress, as claimed by `SET … NX`:  i:<graceMs>:<leaseMs>:<token>[:<fp>]
 *     lease end = PEXPIRETIME - grace, created = lease end - lease (both by the Redis clock,
 *     because `SET … PX` sets the expiry from it)
 *   in progress, as rewritten by a script:  p:<created>:<leaseEnd>:<token>[:<fp>]
 *   completed:  d:<created>:<expires>:<status>:<fpBytes>:<headersBytes>:<token>:<fp><headers><body>
 *     (`fpBytes` empty when there is no fingerprint; headers are JSON [name, value] pairs; the
 *     body is raw bytes, so the record is binary-safe; `token` is the lease that completed it, so
 *     a completion re-sent after its reply was lost is told it landed). Records written before
 *     the token was kept have tag `c` and no token field; they are still read.
 * Lease tokens are UUIDs, so the token field never holds a ':'; a fingerprint is the rest of an
 * in-progress value and is length-prefixed in a completed one, so it may hold anything.
 *
 * Key material only ever travels as KEYS/ARGV, never spliced into the script text. Scripts keep
 * to plain statements (no helper closures) because everything here runs on every call.
 */

/** Redis time in epoch ms. `TIME` before a write is fine: scripts replicate their effects. */
const NOW = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
`;

/** Integers as exact decimal strings (Lua's default number format would print 1.7e+12). */
const INT = (lua: string): string => `string.format('%.0f', ${lua})`;

/**
 * Reads `v` (the record) and, when it is in progress, its lease: sets `tag` ('i' | 'p', nil for
 * a completed record), `tok`, `created`, `lease_end` and `fp` ('' or ':' .. fingerprint).
 */
const LEASE = `
local tag, a, b, tok = string.match(v, '^([ip]):(%d+):(%d+):([^:]+)')
local created, lease_end, fp
if tag then
  fp = string.sub(v, 5 + #a + #b + #tok)
  if tag == 'i' then
    lease_end = redis.call('PEXPIRETIME', KEYS[1]) - tonumber(a)
    created = lease_end - tonumber(b)
  else
    created = tonumber(a)
    lease_end = tonumber(b)
  end
end
`;

/**
 * True when token ARGV[1] holds a live lease on KEYS[1]: the guard of complete, renew, release.
 * Only a live lease counts: once it has run out the key is up for takeover, so a late holder is
 * refused even before anyone has taken over (the in-memory store does the same). `completed`:
 * Lua run when the record is completed (then the guard returns 0).
 */
const held = (completed = ''): string => `
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
${LEASE}
if not tag then${completed} return 0 end
if tok ~= ARGV[1] then return 0 end
${NOW}
if lease_end <= now then return 0 end
`;
const HELD = held();

/**
 * The guard of both completions (ARGV token, ttlMs, status, headersJson; `body` and `bytes` are
 * Lua expressions for the body, false when unknown, and its length). A completed record that
 * this token wrote with these very status, headers and body is this completion: ioredis re-sent
 * it after a reconnect and the first send had landed. It answers 1 as the first send did, or the
 * holder would report a lost lease for an answer that is stored. A re-sent large completion may
 * find its upload gone (the first send took it): then the body's length stands in for it.
 */
const heldToComplete = (body: string, bytes: string): string =>
  held(`
  local d_status, d_fp, d_headers, d_tok, d_at = string.match(v, '^d:%d+:%d+:(%d+):(%d*):(%d+):([^:]+):()')
  if d_tok == ARGV[1] and d_status == ARGV[3] and tonumber(d_headers) == #ARGV[4] then
    local h = d_at + (tonumber(d_fp) or 0)
    local b = h + #ARGV[4]
    if string.sub(v, h, b - 1) == ARGV[4] and #v - b + 1 == ${bytes} and (not ${body} or string.sub(v, b) == ${body}) then return 1 end
  end
`);

/**
 * begin, the contended path: runs when `SET … NX GET` found an in-progress record, so it knows
 * neither that record's lease nor whether it may take it over. KEYS[1] record; ARGV token,
 * leaseMs, graceMs, hasFingerprint ('1'|'0'), fingerprint.
 * Returns {'acquired', tookOver} or {'existing', now, pexpiretime, record}.
 *
 * In-progress keys live for lease + grace, so an expired lease is still visible here and its
 * takeover is reported (tookOver = 1); past the grace Redis has dropped the key natively and the
 * claim is a plain new one (tookOver = 0). A completed record is live while its key exists:
 * Redis expires it at its TTL.
 */
export const BEGIN = `
local v = redis.call('GET', KEYS[1])
${NOW}
local took_over = 0
if v then
  ${LEASE}
  if not tag then return {'existing', now, -1, v} end
  if lease_end > now then
    -- Our own token: ioredis re-sent this begin after a reconnect and the first send had already
    -- claimed the key. Same claim, so answer the same (else the key would look busy to its owner).
    if tok == ARGV[1] then return {'acquired', 0} end
    return {'existing', now, lease_end, v}
  end
  -- Our own lapsed claim (a re-sent begin whose reply was lost) is claimed afresh: no other
  -- holder is displaced, so it is no takeover.
  if tok ~= ARGV[1] then took_over = 1 end
end
local lease = tonumber(ARGV[2])
local claim = 'p:' .. ${INT('now')} .. ':' .. ${INT('now + lease')} .. ':' .. ARGV[1]
if ARGV[4] == '1' then claim = claim .. ':' .. ARGV[5] end
redis.call('SET', KEYS[1], claim, 'PX', lease + tonumber(ARGV[3]))
return {'acquired', took_over}
`;

/**
 * After HELD: replace the held claim by the completed record of `body` (a Lua expression); ARGV
 * token, ttlMs, status, headersJson. Shared by both completions, so they write one format.
 */
const WRITE_COMPLETED = (body: string): string => `
local ttl = tonumber(ARGV[2])
local fp_bytes = ''
if fp ~= '' then
  fp = string.sub(fp, 2)
  fp_bytes = #fp
end
redis.call('SET', KEYS[1], 'd:' .. ${INT('created')} .. ':' .. ${INT('now + ttl')} .. ':' .. ARGV[3] .. ':' ..
  fp_bytes .. ':' .. #ARGV[4] .. ':' .. ARGV[1] .. ':' .. fp .. ARGV[4] .. ${body}, 'PX', ttl)
return 1
`;

/** complete: KEYS[1] record; ARGV token, ttlMs, status, headersJson, body. Returns 1 or 0. */
export const COMPLETE = `${heldToComplete('ARGV[5]', '#ARGV[5]')}${WRITE_COMPLETED('ARGV[5]')}`;

/**
 * stage: KEYS[1] an upload key; ARGV offset, bytes, ttlMs. Writes one chunk of a large body at its
 * offset (so a chunk ioredis re-sends after a reconnect writes the same bytes again, never twice
 * over) and keeps the key expiring, so an upload abandoned halfway leaves nothing behind. A chunk
 * past the end is refused: the one before it never landed (refused for memory, or the key was
 * evicted or expired), and writing past it would leave zeros in its place that the length check
 * of `COMPLETE_STAGED` cannot see.
 */
export const STAGE = `
if tonumber(ARGV[1]) > redis.call('STRLEN', KEYS[1]) then
  return redis.error_reply('ERR idemkit: a chunk of the uploaded body before this one is missing')
end
redis.call('SETRANGE', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
`;

/**
 * complete of a large body uploaded in chunks: KEYS[1] record, KEYS[2] its upload key (same slot);
 * ARGV token, ttlMs, status, headersJson, bodyBytes. Takes the body from the upload key (and
 * deletes it), then does what `COMPLETE` does. An upload that is not whole (a chunk lost or still
 * on its way after a redirection) is an error, so the caller retries, never a refusal. `STAGE`
 * writes no chunk past a gap, so the upload has its full length only when every chunk landed.
 * The guard comes before that check: a re-send of a completion that landed finds the upload
 * gone (the first send took it) and is still told it landed.
 */
export const COMPLETE_STAGED = `
local body = redis.call('GET', KEYS[2])
redis.call('DEL', KEYS[2])
${heldToComplete('body', 'tonumber(ARGV[5])')}
if not body or #body ~= tonumber(ARGV[5]) then return redis.error_reply('ERR idemkit: the uploaded body is incomplete') end
${WRITE_COMPLETED('body')}`;

/** release: KEYS[1] record; ARGV token. Deletes the record if the token holds a live lease; returns 1 or 0. */
export const RELEASE = `${HELD}
redis.call('DEL', KEYS[1])
return 1
`;

/** renew: KEYS[1] record; ARGV token, leaseMs, graceMs. Returns 1 or 0. */
export const RENEW = `${HELD}
local lease = tonumber(ARGV[2])
redis.call('SET', KEYS[1], 'p:' .. ${INT('created')} .. ':' .. ${INT('now + lease')} .. ':' .. tok .. fp,
  'PX', lease + tonumber(ARGV[3]))
return 1
`;

/**
 * get: KEYS[1] record. Returns {now, leaseEnd, record} (leaseEnd -1 for a completed record), or
 * nil when there is no record or its lease has run out.
 */
export const GET = `
local v = redis.call('GET', KEYS[1])
if not v then return false end
${LEASE}
if not tag then return {0, -1, v} end
${NOW}
if lease_end <= now then return false end
return {now, lease_end, v}
`;
