//! Lua scripts, one place. Time comes from the service (ARGV), never Redis `TIME`,
//! so the service clock is the only clock and tests can move it.

/// Decide and charge all counters of one request, atomically (all-or-nothing).
///
/// KEYS[1..n]  counter keys, one per limited descriptor, in request order
///             (duplicates allowed: a key's charges accumulate within the call)
/// KEYS[n+1]   idempotency key, present only when ARGV[3] > 0
/// KEYS[n+2]   the same key as the service named it before (read when
///             KEYS[n+1] is absent, never written), present with KEYS[n+1]
///
/// ARGV[1]     now_ms (service clock, integer ms)
/// ARGV[2]     "1" = settle (apply unconditionally), "0" = reserve (all-or-nothing)
/// ARGV[3]     idempotency TTL in ms, 0 = no idempotency key
/// ARGV[4]     n
/// then 5 per counter i (base = 4 + 5*(i-1)):
///   kind      1 = GCRA, 2 = calendar
///   limit     integer (<= 2^53-1)
///   hits      integer (0 = pure check)
///   refund    "1" = give hits back (clamped at zero), "0" = charge
///   param     GCRA: period_ms; calendar: ms until the window ends (the key's TTL)
///
/// GCRA state is a string "<level in hit·ms> <ms the level is as of>" (a caller
/// whose clock is behind keeps the stored time: it neither refills nor moves
/// the bucket's time back, which would refill that gap twice); the level drains
/// by `limit` per ms, capacity is limit*period (burst = the full limit), one hit
/// costs `period` — integer arithmetic, exact while values stay below 2^53.
/// Calendar state is a plain integer counter with PEXPIRE at the window end.
///
/// Optional ledger section (absent: `#ARGV == 4 + 5n`), at base = 4 + 5n;
/// its keys follow the counters' and the idempotency keys (KEYS[off + j],
/// off = n + 2 with an idempotency key, n without). See [`crate::ledger`].
///   ARGV[base+1] quota index key (j, 0 = none)   ARGV[base+2] its most entries
///   ARGV[base+3] alert stream key (j, 0 = none)  ARGV[base+4] its MAXLEN ~
///   ARGV[base+5] quota index parameters of each counter, joined by ';':
///        "<unit letter>|<window start>|<tz>|<anchor>" ('' = not indexed);
///        split only when a charge creates a counter
///   ARGV[base+6] alerts of each counter, joined by ';': "<percent>:<threshold>,..."
///        ('' = none); the whole argument is '' when no counter has alerts
///   The quota index field is the counter key without `tg:<tag>:` and the
///   window (`<unit letter>:<entries>`); its value
///   `1|<unit letter>|<limit>|<start>|<end>|<period>|<tz>|<anchor>|<counter key>`.
///   then m, then m ops:
///     'H' key ttl p f1 v1 .. fp vp        HINCRBY each; PEXPIRE when the first field is new
///     'Z' key ttl score member trim       ZADD; when new: ZREMRANGEBYSCORE -inf '(trim', PEXPIRE
///     'X' key ttl maxlen p f1 v1 ..       XADD MAXLEN ~, PEXPIRE
/// The section runs only when the batch is applied and not a replay, so it is
/// exactly as idempotent as the charges. A counter charged while absent
/// (a new window or bucket) gets its quota index entry (if the index has room;
/// the index expires no sooner than its longest window). A calendar counter
/// whose usage goes from below a threshold to at or above it takes the alert
/// key `<counter key>:alert:<percent>` with SET NX (expiring with the window:
/// once per counter, window and threshold, across replicas), and only the
/// taker appends to the alert stream and reports it.
///
/// Returns {overall (1 = OK, 2 = OVER_LIMIT), replay (0/1), fits_1, used_1, ..., fits_n, used_n,
///          [a, counter_1, percent_1, used_1, ..., counter_a, percent_a, used_a]}
/// where used is the state after the charge if applied, before it otherwise;
/// the bracketed part comes only with a ledger section: the alerts taken
/// (counter index from 0, percent, usage after the charge).
/// Over = used + hits > limit (exactly reaching the limit is allowed).
/// On replay (idempotency key exists) nothing is charged, overall is the stored
/// decision and the states are read as for a pure check.
pub const DECIDE: &str = r#"
local now = tonumber(ARGV[1])
local settle = ARGV[2] == '1'
local idem_ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])

local replay = false
local stored = nil
if idem_ttl > 0 then
  stored = redis.call('GET', KEYS[n + 1])
  -- a call retried across the upgrade to short keys: its first attempt's
  -- decision under the old name
  if not stored then stored = redis.call('GET', KEYS[n + 2]) end
  if stored then replay = true end
end

local function fmt(x) return string.format('%.17g', x) end

local cur = {}      -- key -> pending value within this call
local stamp = {}    -- GCRA key -> the time its level is as of (never before the stored one)
local existed = {}  -- key -> it held state before this call
local kinds = {}    -- key -> {kind, limit, param}
local before = {}
local after = {}
local fits = {}
local all_fit = true

for i = 1, n do
  local b = 4 + 5 * (i - 1)
  local kind = tonumber(ARGV[b + 1])
  local limit = tonumber(ARGV[b + 2])
  local hits = tonumber(ARGV[b + 3])
  local refund = ARGV[b + 4] == '1'
  local param = tonumber(ARGV[b + 5])
  if replay then hits = 0 end
  local key = KEYS[i]
  local v = cur[key]
  local cost, cap
  if kind == 1 then
    if v == nil then
      local l, t = 0, now
      local raw = redis.call('GET', key)
      existed[key] = raw ~= false
      if raw then
        local sl, st = string.match(raw, '^(%S+) (%S+)$')
        l = tonumber(sl) or 0
        t = tonumber(st) or now
      end
      local elapsed = now - t
      -- a clock behind the last writer never refills, and never moves the
      -- bucket's time back (the next caller would refill that gap twice)
      if elapsed < 0 then elapsed = 0 end
      l = l - elapsed * limit
      if l < 0 then l = 0 end
      v = l
      stamp[key] = math.max(now, t)
    end
    cost = hits * param
    cap = limit * param
  else
    if v == nil then
      local raw = redis.call('GET', key)
      existed[key] = raw ~= false
      v = tonumber(raw) or 0
    end
    cost = hits
    cap = limit
  end
  local nv
  if refund then
    nv = v - cost
    if nv < 0 then nv = 0 end
    fits[i] = 1
  else
    nv = v + cost
    if nv <= cap then fits[i] = 1 else fits[i] = 0; all_fit = false end
  end
  before[i] = v
  after[i] = nv
  cur[key] = nv
  if cost > 0 then kinds[key] = {kind, limit, param} end
end

local overall
if replay then
  overall = tonumber(stored)
elseif settle or all_fit then
  overall = 1
  for key, k in pairs(kinds) do
    local v = cur[key]
    if k[1] == 1 then
      if v <= 0 then
        redis.call('DEL', key)
      else
        local at = stamp[key] or now
        local ttl = k[3]
        if k[2] > 0 then ttl = math.ceil(v / k[2]) + 1 + (at - now) end
        redis.call('SET', key, fmt(v) .. ' ' .. fmt(at), 'PX', ttl)
      end
    else
      redis.call('SET', key, fmt(v), 'PX', k[3])
    end
  end
else
  overall = 2
end

if idem_ttl > 0 and not replay then
  redis.call('SET', KEYS[n + 1], overall, 'PX', idem_ttl)
end

local out = {overall, replay and 1 or 0}
for i = 1, n do
  out[#out + 1] = fits[i]
  if overall == 1 and not replay then
    out[#out + 1] = after[i]
  else
    out[#out + 1] = before[i]
  end
end

local base = 4 + 5 * n
if #ARGV <= base then return out end
local off = n
if idem_ttl > 0 then off = n + 2 end
local taken = {}
if overall == 1 and not replay then
  local qi = tonumber(ARGV[base + 1])
  local qcap = tonumber(ARGV[base + 2])
  local si = tonumber(ARGV[base + 3])
  local smax = ARGV[base + 4]
  local qttl = 0
  local function split(packed)
    local t = {}
    for part in string.gmatch(packed .. ';', '([^;]*);') do t[#t + 1] = part end
    return t
  end
  local idxs = nil
  local alerts_of = nil
  if ARGV[base + 6] ~= '' then alerts_of = split(ARGV[base + 6]) end
  for i = 1, n do
    local key = KEYS[i]
    local kb = 4 + 5 * (i - 1)
    local param = tonumber(ARGV[kb + 5])
    if qi > 0 and not existed[key] and tonumber(ARGV[kb + 3]) > 0 and ARGV[kb + 4] ~= '1' then
      existed[key] = true
      idxs = idxs or split(ARGV[base + 5])
      local u, start, tz, anchor = string.match(idxs[i] or '', '^(%a)|([^|]*)|([^|]*)|([^|]*)$')
      local rest = string.match(key, '^tg:{[^}]*}:%a:(.*)$')
      if u and rest then
        local fin, period = '-', '-'
        if ARGV[kb + 1] == '2' then
          rest = string.match(rest, '^%-?%d+:(.*)$') or rest
          fin = fmt(now + param)
        else
          period = ARGV[kb + 5]
        end
        local field = u .. ':' .. rest
        local qk = KEYS[off + qi]
        local val = table.concat({'1', u, ARGV[kb + 2], start, fin, period, tz, anchor, key}, '|')
        -- a rate bucket that drained and refills has the same entry: a read
        local cur = redis.call('HGET', qk, field)
        if cur ~= val and (cur or redis.call('HLEN', qk) < qcap) then
          redis.call('HSET', qk, field, val)
          if param > qttl then qttl = param end
        end
      end
    end
    local alerts = alerts_of and alerts_of[i] or ''
    -- only a charge crosses a threshold
    if alerts ~= '' and ARGV[kb + 1] == '2' and after[i] > before[i] then
      for p, thr in string.gmatch(alerts, '(%d+):(%d+)') do
        local t = tonumber(thr)
        if before[i] < t and after[i] >= t then
          if redis.call('SET', key .. ':alert:' .. p, fmt(after[i]), 'NX', 'PX', param) then
            taken[#taken + 1] = {i, tonumber(p), after[i]}
            if si > 0 then
              redis.call('XADD', KEYS[off + si], 'MAXLEN', '~', smax, '*', 'v', '1', 'counter', key,
                'percent', p, 'threshold', thr, 'used', fmt(after[i]), 'at', ARGV[1])
            end
          end
        end
      end
    end
  end
  if qttl > 0 then
    local qk = KEYS[off + qi]
    if redis.call('PTTL', qk) < qttl then redis.call('PEXPIRE', qk, qttl) end
  end
  local j = base + 7
  local m = tonumber(ARGV[j])
  j = j + 1
  for _ = 1, m do
    local op = ARGV[j]
    local k = KEYS[off + tonumber(ARGV[j + 1])]
    local ttl = ARGV[j + 2]
    if op == 'H' then
      local p = tonumber(ARGV[j + 3])
      local fresh = false
      for f = 1, p do
        local v = redis.call('HINCRBY', k, ARGV[j + 2 + 2 * f], ARGV[j + 3 + 2 * f])
        -- a new hash has only new fields: set its TTL (anchored to its day) once
        if f == 1 and v == tonumber(ARGV[j + 3 + 2 * f]) then fresh = true end
      end
      if fresh then redis.call('PEXPIRE', k, ttl) end
      j = j + 4 + 2 * p
    elseif op == 'Z' then
      if redis.call('ZADD', k, ARGV[j + 3], ARGV[j + 4]) == 1 then
        redis.call('ZREMRANGEBYSCORE', k, '-inf', '(' .. ARGV[j + 5])
        redis.call('PEXPIRE', k, ttl)
      end
      j = j + 6
    else
      local p = tonumber(ARGV[j + 4])
      local xa = {'XADD', k, 'MAXLEN', '~', ARGV[j + 3], '*'}
      for f = 1, 2 * p do xa[#xa + 1] = ARGV[j + 4 + f] end
      redis.call(unpack(xa))
      redis.call('PEXPIRE', k, ttl)
      j = j + 5 + 2 * p
    end
  end
end
out[#out + 1] = #taken
for _, t in ipairs(taken) do
  out[#out + 1] = t[1] - 1
  out[#out + 1] = t[2]
  out[#out + 1] = t[3]
end
return out
"#;
