//! The Lua scripts behind every state transition of the Redis store.
//!
//! Each transition is one script, so it is atomic on the server: a claim, heartbeat, ack, retry,
//! bury or release either checks the caller's lease token and applies, or changes nothing. Times
//! come from the server's `TIME`, never from a worker's clock. Every key of a queue starts with
//! the prefix `{jobspool:NAME}` (passed as `ARGV[1]`; `KEYS[1]` is one of those keys so that a
//! cluster client routes the call to the slot that holds them all).
//!
//! Keys under the prefix `P`:
//! - `P:config` — the queue's `jobspool.toml` text;
//! - `P:seq` — the lease counter (INCR), so no two claims ever share a token;
//! - `P:ready` — ZSET of ready ids, score = priority key * 2^42 + ready time (ms), so the lowest
//!   score is the highest priority, oldest first; `P:ready_t` the same ids by ready time alone;
//! - `P:sched` — ZSET of scheduled ids by due time; `P:running` by lease expiry; `P:dead` by time
//!   of death; `P:quarantine` by time set aside;
//! - `P:job:ID` — HASH: body (the version-1 job body with its checksum), pkey, attempts,
//!   max_attempts (0 = the queue's), state, since, token, runner, reason;
//! - `P:events:ID` — LIST of JSON history events; `P:log:ID` — the log (its head trimmed past the
//!   cap, `P:logoff:ID` counting the bytes trimmed, so offsets stay stable);
//! - `P:runners` — HASH runner id → "HEARTBEAT_MS STATUS_JSON";
//! - `P:claimreq:REQ` — "ID TOKEN" of the claim made for request REQ, kept a while (see `CLAIM`);
//!   `P:pushreq:REQ` marks an applied push request, `P:ended:TOKEN` the op that ended a claim
//!   (see `unclaim`), both for two minutes, so that repeating a request whose answer was lost is
//!   answered as the first time and applied once;
//! - `P:wake` — the pub/sub channel a push, retry, release or revive publishes on.

/// Helpers shared by every script. Numbers are formatted with `%.0f`: Lua's default formatting
/// keeps 14 digits, which would round the 16-digit ready scores.
const PRELUDE: &str = r#"
local P = ARGV[1]
-- How long a request's outcome is remembered so that a repeat of it is answered, not reapplied.
local REPEAT_WINDOW_MS = 120000
local function N(x) return string.format('%.0f', x) end
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function jk(id) return P .. ':job:' .. id end
-- Appends an event (JSON) to a job's history, keeping its last 1000.
local function add_event(id, json)
  local k = P .. ':events:' .. id
  redis.call('RPUSH', k, json)
  redis.call('LTRIM', k, -1000, -1)
end
local function event(id, t, kind, attempt, runner, detail)
  local e = '{"at":' .. N(t) .. ',"kind":"' .. kind .. '","attempt":' .. N(attempt)
  if runner and runner ~= '' then e = e .. ',"runner":' .. cjson.encode(runner) end
  if detail then e = e .. ',"detail":' .. cjson.encode(detail) end
  add_event(id, e .. '}')
end
-- A client's event (JSON) in a job's history; a finished job's history expires after `keep` ms.
local function record(id, json, keep)
  add_event(id, json)
  if redis.call('EXISTS', jk(id)) == 0 then redis.call('PEXPIRE', P .. ':events:' .. id, keep) end
end
-- Appends `bytes` to a job's log, dropping its oldest half past `cap` bytes (`P:logoff:ID`
-- counts what was dropped, so offsets stay stable); a finished job's log expires after `keep`
-- ms. Returns the log's size: bytes ever written.
local function log_append(id, bytes, cap, keep)
  local k, off = P .. ':log:' .. id, P .. ':logoff:' .. id
  local len = redis.call('APPEND', k, bytes)
  cap = tonumber(cap)
  if len > cap then
    local drop = len - math.floor(cap / 2)
    redis.call('SET', k, redis.call('GETRANGE', k, drop, -1), 'KEEPTTL')
    redis.call('INCRBY', off, drop)
    len = len - drop
  end
  if redis.call('EXISTS', jk(id)) == 0 then
    redis.call('PEXPIRE', k, keep); redis.call('PEXPIRE', off, keep)
  end
  return len + tonumber(redis.call('GET', off) or '0')
end
local function to_ready(id, at)
  local pk = tonumber(redis.call('HGET', jk(id), 'pkey'))
  redis.call('ZADD', P .. ':ready', N(pk * 4398046511104 + at), id)
  redis.call('ZADD', P .. ':ready_t', N(at), id)
  redis.call('HSET', jk(id), 'state', 'ready', 'since', N(at), 'token', '', 'runner', '')
end
local function to_sched(id, at)
  redis.call('ZADD', P .. ':sched', N(at), id)
  redis.call('HSET', jk(id), 'state', 'scheduled', 'since', N(at), 'token', '', 'runner', '')
end
local function to_dead(id, t, attempt, runner, reason)
  redis.call('ZADD', P .. ':dead', N(t), id)
  redis.call('HSET', jk(id), 'state', 'dead', 'since', N(t), 'token', '', 'runner', '')
  event(id, t, 'dead', attempt, runner, reason)
end
local function leave(id, state)
  if state == 'ready' then
    redis.call('ZREM', P .. ':ready', id)
    redis.call('ZREM', P .. ':ready_t', id)
  elseif state == 'scheduled' then redis.call('ZREM', P .. ':sched', id)
  elseif state == 'running' then redis.call('ZREM', P .. ':running', id)
  elseif state == 'dead' then redis.call('ZREM', P .. ':dead', id)
  elseif state == 'quarantined' then redis.call('ZREM', P .. ':quarantine', id)
  end
end
local function wake() redis.call('PUBLISH', P .. ':wake', 'w') end
local function promote(t)
  local due = redis.call('ZRANGEBYSCORE', P .. ':sched', '-inf', N(t), 'WITHSCORES', 'LIMIT', 0, 1000)
  for i = 1, #due, 2 do
    redis.call('ZREM', P .. ':sched', due[i])
    to_ready(due[i], tonumber(due[i + 1]))
  end
end
-- Takes back claims whose lease ran out: one attempt counted, dead when none is left.
local function reclaim(t, maxdef, limit)
  local out = {}
  local expired = redis.call('ZRANGEBYSCORE', P .. ':running', '-inf', '(' .. N(t), 'LIMIT', 0, limit)
  for _, id in ipairs(expired) do
    local h = redis.call('HMGET', jk(id), 'token', 'attempts', 'max_attempts', 'runner')
    local attempts = tonumber(h[2]) + 1
    local max = tonumber(h[3])
    if max == 0 then max = maxdef end
    if max < 1 then max = 1 end
    redis.call('ZREM', P .. ':running', id)
    redis.call('HSET', jk(id), 'attempts', attempts)
    event(id, t, 'reclaimed', attempts, h[4], 'attempt ' .. attempts .. ': its lease expired')
    local buried = 0
    if attempts >= max then
      to_dead(id, t, attempts, nil, 'its lease expired on attempt ' .. attempts .. ' of ' .. max .. '; no attempts left')
      buried = 1
    else
      to_ready(id, t)
    end
    table.insert(out, id); table.insert(out, h[1]); table.insert(out, attempts); table.insert(out, buried)
  end
  if #expired > 0 then wake() end
  return out
end
local function held(id, token)
  local h = redis.call('HMGET', jk(id), 'state', 'token')
  return h[1] == 'running' and h[2] == token
end
-- Ends a claim with `op` (ack, retry, bury, release, quarantine) if `token` still holds it: the
-- fencing every ending transition goes through. Returns 'now' when it did; 'before' when this
-- very op already ended this claim (a repeat of a request whose answer was lost: answered as a
-- success, applied once); nil when the lease is lost.
local function unclaim(id, token, op)
  local ended = P .. ':ended:' .. token
  if not held(id, token) then
    if redis.call('GET', ended) == op then return 'before' end
    return nil
  end
  redis.call('ZREM', P .. ':running', id)
  redis.call('SET', ended, op, 'PX', REPEAT_WINDOW_MS)
  return 'now'
end
-- The transitions that end a claim, by op name, each taking the job id, the lease token and
-- one argument, and answering as `unclaim` does.
local ends = {}
-- Done: the job is removed; its log and history expire after `keep` ms.
function ends.ack(id, token, keep)
  local how = unclaim(id, token, 'ack')
  if how ~= 'now' then return how end
  redis.call('DEL', jk(id))
  for _, k in ipairs({':log:', ':logoff:', ':events:'}) do redis.call('PEXPIRE', P .. k .. id, keep) end
  return how
end
-- Counts the attempt and schedules the next one `delay` ms from now.
function ends.retry(id, token, delay)
  local how = unclaim(id, token, 'retry')
  if how ~= 'now' then return how end
  redis.call('HINCRBY', jk(id), 'attempts', 1)
  delay = tonumber(delay)
  local t = now()
  if delay > 0 then to_sched(id, t + delay) else to_ready(id, t) end
  wake()
  return how
end
-- Counts the attempt; the job is dead with `reason`.
function ends.bury(id, token, reason)
  local runner = redis.call('HGET', jk(id), 'runner')
  local how = unclaim(id, token, 'bury')
  if how ~= 'now' then return how end
  local attempts = redis.call('HINCRBY', jk(id), 'attempts', 1)
  to_dead(id, now(), attempts, runner, reason)
  return how
end
-- Back to ready without counting an attempt.
function ends.release(id, token)
  local how = unclaim(id, token, 'release')
  if how ~= 'now' then return how end
  to_ready(id, now())
  wake()
  return how
end
"#;

/// ARGV: P, request id, count, then per job: id, body, pkey, delay_ms, max_attempts. All or
/// nothing: when any id exists (or is repeated), returns `{'exists', id}`, or `{'finished', id}`
/// when only a finished job's log or history holds it, and writes nothing. A repeat of a request
/// that was applied (its answer lost on the wire) answers `{'ok'}` again and adds nothing.
pub const PUSH: &str = r#"
local t = now()
local req = P .. ':pushreq:' .. ARGV[2]
if redis.call('EXISTS', req) == 1 then return {'ok'} end
local n = tonumber(ARGV[3])
local seen = {}
for i = 0, n - 1 do
  local id = ARGV[4 + i * 5]
  if seen[id] or redis.call('EXISTS', jk(id)) > 0 then return {'exists', id} end
  if redis.call('EXISTS', P .. ':log:' .. id, P .. ':events:' .. id) > 0 then return {'finished', id} end
  seen[id] = true
end
for i = 0, n - 1 do
  local b = 4 + i * 5
  local id, delay = ARGV[b], tonumber(ARGV[b + 3])
  redis.call('HSET', jk(id), 'body', ARGV[b + 1], 'pkey', ARGV[b + 2], 'attempts', 0,
    'max_attempts', ARGV[b + 4], 'created', N(t))
  if delay > 0 then to_sched(id, t + delay) else to_ready(id, t) end
end
redis.call('SET', req, '1', 'PX', REPEAT_WINDOW_MS)
wake()
return {'ok'}
"#;

/// ARGV: P, lease_ms, runner, max_attempts (for reclaim), request id. Promotes due scheduled
/// jobs, reclaims expired leases, then claims the best ready job: `{1, reclaimed, id, token,
/// attempt, body}` or `{0, reclaimed}`.
///
/// A claim whose answer was lost (the connection dropped after the server ran it) would hold
/// its job, unknown to anyone, until the lease expired. So each claim is remembered under its
/// request id for a while, and a caller that repeats a request id whose answer it never got is
/// given that same claim back, as long as it still holds.
pub const CLAIM: &str = r#"
local t = now()
local req = P .. ':claimreq:' .. ARGV[5]
local prev = redis.call('GET', req)
if prev then
  local id, token = string.match(prev, '^(.-) (.*)$')
  if id and held(id, token) then
    local attempts = tonumber(redis.call('HGET', jk(id), 'attempts'))
    return {1, {}, id, token, attempts + 1, redis.call('HGET', jk(id), 'body')}
  end
end
promote(t)
local reclaimed = reclaim(t, tonumber(ARGV[4]), 100)
local id = redis.call('ZRANGE', P .. ':ready', 0, 0)[1]
if not id then return {0, reclaimed} end
leave(id, 'ready')
-- The claim time makes tokens unique even across a server that lost its data (and counter).
local token = redis.call('INCR', P .. ':seq') .. '.' .. N(t) .. '@' .. P
local attempts = tonumber(redis.call('HGET', jk(id), 'attempts'))
redis.call('HSET', jk(id), 'state', 'running', 'since', N(t), 'token', token, 'runner', ARGV[3], 'lease_ms', ARGV[2])
redis.call('ZADD', P .. ':running', N(t + tonumber(ARGV[2])), id)
redis.call('SET', req, id .. ' ' .. token, 'PX', N(math.max(60000, 2 * tonumber(ARGV[2]))))
return {1, reclaimed, id, token, attempts + 1, redis.call('HGET', jk(id), 'body')}
"#;

/// ARGV: P, max_attempts. `{id, old_token, attempts, buried}...`
pub const RECLAIM: &str = r#"
return reclaim(now(), tonumber(ARGV[2]), 1000)
"#;

/// ARGV: P, id, token. Extends the lease by its length at claim: 1, or 0 when the lease is lost.
pub const HEARTBEAT: &str = r#"
if not held(ARGV[2], ARGV[3]) then return 0 end
local ms = tonumber(redis.call('HGET', jk(ARGV[2]), 'lease_ms'))
redis.call('ZADD', P .. ':running', 'XX', N(now() + ms), ARGV[2])
return 1
"#;

/// ARGV: P, id, token, retention_ms. The job is done: removed; its log and history expire later.
pub const ACK: &str = r#"
return ends.ack(ARGV[2], ARGV[3], ARGV[4]) and 1 or 0
"#;

/// ARGV: P, id, token, delay_ms. Counts the attempt and schedules the next one.
pub const RETRY: &str = r#"
return ends.retry(ARGV[2], ARGV[3], ARGV[4]) and 1 or 0
"#;

/// ARGV: P, id, token, reason. Counts the attempt; the job is dead with the reason.
pub const BURY: &str = r#"
return ends.bury(ARGV[2], ARGV[3], ARGV[4]) and 1 or 0
"#;

/// ARGV: P, id, token. Back to ready without counting an attempt.
pub const RELEASE: &str = r#"
return ends.release(ARGV[2], ARGV[3]) and 1 or 0
"#;

/// ARGV: P, id, token, reason. Sets a claimed job whose body is not valid aside.
pub const QUARANTINE: &str = r#"
local id = ARGV[2]
local how = unclaim(id, ARGV[3], 'quarantine')
if how ~= 'now' then return how and 1 or 0 end
local t = now()
redis.call('ZADD', P .. ':quarantine', N(t), id)
redis.call('HSET', jk(id), 'state', 'quarantined', 'since', N(t), 'token', '', 'reason', ARGV[4])
return 1
"#;

/// ARGV: P, id. A dead job back to ready with its attempts reset. Returns its state before.
pub const REVIVE: &str = r#"
local id = ARGV[2]
local state = redis.call('HGET', jk(id), 'state')
if state ~= 'dead' then return state or '' end
leave(id, 'dead')
local t = now()
redis.call('HSET', jk(id), 'attempts', 0)
redis.call('HDEL', jk(id), 'reason')
to_ready(id, t)
event(id, t, 'revived', 0, nil, nil)
wake()
return 'dead'
"#;

/// ARGV: P, id. Removes a job in any state, with its log and history. Returns its state before:
/// 'finished' when only a finished job's log and history were left (removing them frees the id),
/// '' when nothing was known.
pub const REMOVE: &str = r#"
local id = ARGV[2]
local state = redis.call('HGET', jk(id), 'state')
if not state then
  local n = redis.call('DEL', P .. ':log:' .. id, P .. ':logoff:' .. id, P .. ':events:' .. id)
  if n > 0 then return 'finished' end
  return ''
end
leave(id, state)
redis.call('DEL', jk(id), P .. ':log:' .. id, P .. ':logoff:' .. id, P .. ':events:' .. id)
return state
"#;

/// ARGV: P. `{ready, scheduled, running, dead, quarantined, oldest ready time or -1}`, one
/// consistent observation.
pub const STATS: &str = r#"
local oldest = redis.call('ZRANGE', P .. ':ready_t', 0, 0, 'WITHSCORES')
return {redis.call('ZCARD', P .. ':ready'), redis.call('ZCARD', P .. ':sched'),
  redis.call('ZCARD', P .. ':running'), redis.call('ZCARD', P .. ':dead'),
  redis.call('ZCARD', P .. ':quarantine'), oldest[2] and N(tonumber(oldest[2])) or '-1'}
"#;

/// ARGV: P. Milliseconds until the earliest scheduled job is due (0 when overdue), or -1.
pub const NEXT_DUE: &str = r#"
local first = redis.call('ZRANGE', P .. ':sched', 0, 0, 'WITHSCORES')
if not first[2] then return -1 end
local wait = tonumber(first[2]) - now()
if wait < 0 then wait = 0 end
return wait
"#;

/// ARGV: P, id, bytes, cap, retention_ms. Appends to a log, trimming its head past the cap.
/// Returns the log's size (bytes ever written).
pub const LOG_APPEND: &str = r#"
return log_append(ARGV[2], ARGV[3], ARGV[4], ARGV[5])
"#;

/// ARGV: P, id, event JSON, retention_ms. Appends to a job's history.
pub const RECORD: &str = r#"
record(ARGV[2], ARGV[3], ARGV[4])
return 1
"#;

/// ARGV: P, id, header, cap, retention_ms, started event JSON. The start of an attempt in one
/// step: appends the header to the log (as `LOG_APPEND`) and the event to the history (as
/// `RECORD`). Returns the offset where the header starts. Like those two, it does not check the
/// lease (the claim was just made) and is not safe to repeat.
pub const BEGIN_ATTEMPT: &str = r#"
local id, header = ARGV[2], ARGV[3]
local size = log_append(id, header, ARGV[4], ARGV[5])
record(id, ARGV[6], ARGV[5])
return size - #header
"#;

/// ARGV: P, id, token, op (ack, retry, bury, release), op's argument (retention_ms, delay_ms,
/// reason, ''), trailer, cap, retention_ms, event JSON ('' for none). The end of an attempt in
/// one step: the transition `op` (as `ACK`, `RETRY`, `BURY`, `RELEASE`), then the trailer
/// appended to the log and the event to the history. Only if `token` still holds the claim:
/// otherwise nothing is written and it returns 0 (lease lost). A repeat of a call that applied
/// (its answer lost) finds `op` recorded for the claim and returns 1, writing nothing again.
pub const END_ATTEMPT: &str = r#"
local id = ARGV[2]
local how = ends[ARGV[4]](id, ARGV[3], ARGV[5])
if how == 'now' then
  log_append(id, ARGV[6], ARGV[7], ARGV[8])
  if ARGV[9] ~= '' then record(id, ARGV[9], ARGV[8]) end
end
return how and 1 or 0
"#;

/// ARGV: P, runner id, status JSON. Stamps the registration with the server's time.
pub const ANNOUNCE: &str = r#"
redis.call('HSET', P .. ':runners', ARGV[2], N(now()) .. ' ' .. ARGV[3])
return 1
"#;

/// ARGV: P. `{now, id, entry, id, entry...}`.
pub const RUNNERS: &str = r#"
local out = {N(now())}
for _, v in ipairs(redis.call('HGETALL', P .. ':runners')) do table.insert(out, v) end
return out
"#;

/// ARGV: P, max_silence_ms. Removes registrations silent for longer than that; returns how many.
pub const FORGET_RUNNERS: &str = r#"
local t, n = now(), 0
local all = redis.call('HGETALL', P .. ':runners')
for i = 1, #all, 2 do
  local hb = tonumber(string.match(all[i + 1], '^(%d+)'))
  if hb and t - hb > tonumber(ARGV[2]) then redis.call('HDEL', P .. ':runners', all[i]); n = n + 1 end
end
return n
"#;

/// The full text of a script: the shared helpers, then its body.
pub fn source(body: &str) -> String {
    let mut s = String::with_capacity(PRELUDE.len() + body.len());
    s.push_str(PRELUDE);
    s.push_str(body);
    s
}
