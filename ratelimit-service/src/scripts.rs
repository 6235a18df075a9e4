//! Lua scripts, one place. Time comes from the service (ARGV), never Redis `TIME`,
//! so the service clock is the only clock and tests can move it.

/// Decide and charge all counters of one request, atomically (all-or-nothing).
///
/// KEYS[1..n]  counter keys, one per limited descriptor, in request order
///             (duplicates allowed: a key's charges accumulate within the call)
/// KEYS[n+1]   idempotency key, present only when ARGV[3] > 0
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
/// Returns {overall (1 = OK, 2 = OVER_LIMIT), replay (0/1), fits_1, used_1, ..., fits_n, used_n}
/// where used is the state after the charge if applied, before it otherwise.
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
  if stored then replay = true end
end

local function fmt(x) return string.format('%.17g', x) end

local cur = {}      -- key -> pending value within this call
local stamp = {}    -- GCRA key -> the time its level is as of (never before the stored one)
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
    if v == nil then v = tonumber(redis.call('GET', key)) or 0 end
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
return out
"#;
