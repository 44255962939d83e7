"""The Lua scripts the Redis limiter runs: each one atomic on the server, whatever the number of
gateway processes and replicas calling it.

Keys per subject (a team or a key): ``…:m`` a hash of one-second buckets (``r<second>`` requests,
``t<second>`` tokens) over the last 60 seconds, with their sums (``R``, ``T``) and the oldest second
that may still hold one (``o``; every bucket is within 60 seconds of it), so that a check reads only
the seconds that left the window since the last; ``…:l`` a sorted set of leases scored by their expiry
(milliseconds); ``…:a`` a hash of what each lease reserved against the budget, with their sum in
``_total``; ``…:s:<period>`` the micro-dollars settled in a budget period. Expired leases are swept
by every script that reads them, so a process that died leaves nothing held for longer than its
leases' life. Time is the Redis server's (``TIME``), one clock for every replica.
"""

from __future__ import annotations

COMMON = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local second = math.floor(now / 1000)
local first = second - 59

local function sweep(w, l, a)
  -- the leases that expired, and what they reserved
  local gone = redis.call('ZRANGEBYSCORE', l, '-inf', now)
  for _, id in ipairs(gone) do
    local amount = redis.call('HGET', a, id)
    if amount then
      redis.call('HINCRBY', a, '_total', -tonumber(amount))
      redis.call('HDEL', a, id)
    end
  end
  if #gone > 0 then
    redis.call('ZREMRANGEBYSCORE', l, '-inf', now)
  end
  -- the window: sums kept beside the seconds, so only the seconds that left it are read
  local meta = redis.call('HMGET', w, 'o', 'R', 'T')
  local o, r, t = tonumber(meta[1]), tonumber(meta[2]) or 0, tonumber(meta[3]) or 0
  if o and o < first then
    if first - o >= 60 then
      redis.call('DEL', w)
      o, r, t = nil, 0, 0
    else
      for s = o, first - 1 do
        local old = redis.call('HMGET', w, 'r' .. s, 't' .. s)
        if old[1] or old[2] then
          r = r - (tonumber(old[1]) or 0)
          t = t - (tonumber(old[2]) or 0)
          redis.call('HDEL', w, 'r' .. s, 't' .. s)
        end
      end
      o = first
      redis.call('HSET', w, 'o', o, 'R', r, 'T', t)
    end
  end
  local oldest_r, oldest_t = -1, -1
  if o and (r > 0 or t > 0) then
    for s = o, second do
      local counts = redis.call('HMGET', w, 'r' .. s, 't' .. s)
      if oldest_r < 0 and (tonumber(counts[1]) or 0) > 0 then oldest_r = s end
      if oldest_t < 0 and (tonumber(counts[2]) or 0) > 0 then oldest_t = s end
      if (oldest_r >= 0 or r <= 0) and (oldest_t >= 0 or t <= 0) then break end
    end
  end
  return {r, t, oldest_r, oldest_t, redis.call('ZCARD', l), tonumber(redis.call('HGET', a, '_total') or '0')}
end
"""

ADMIT = (
    COMMON
    + """
-- KEYS: w, l, a, s per subject. ARGV: per subject rpm, tpm, concurrent, budget (-1: no such
-- limit), then lease_ms, then the request's own "<lease> <tokens> <cost>" (one argument, written
-- at once). The answer is one line of words:
--   ok <second> then for requests and for tokens the tightest limit (this request counted):
--      <limit> <remaining> <reset in ms>, or - - - without such a limit
--   no <now ms> <subject> <limit kind> <spent> <reserved> then per subject the four, as found
--   seed <subject>: its budget period's spent amount is missing
local n = #KEYS / 4
local lease_ms = tonumber(ARGV[4 * n + 1])
local lease, tokens, cost = string.match(ARGV[4 * n + 2], '^(.+) (%d+) (%d+)$')
tokens, cost = tonumber(tokens), tonumber(cost)
local function line(words)
  for i = 1, #words do
    if type(words[i]) == 'number' then words[i] = string.format('%d', words[i]) end
  end
  return table.concat(words, ' ')
end
local found = {}
for i = 1, n do
  found[i] = sweep(KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1])
end
for i = 1, n do
  local base = 4 * (i - 1)
  local rpm, tpm = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local concurrent, budget = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
  local f = found[i]
  local spent = 0
  if budget >= 0 then
    local value = redis.call('GET', KEYS[4 * i])
    if not value then
      return line({'seed', i})
    end
    spent = tonumber(value)
  end
  local refused = false
  if concurrent >= 0 and f[5] >= concurrent then
    refused = 'concurrent'
  elseif rpm >= 0 and f[1] + 1 > rpm then
    refused = 'rpm'
  elseif tpm >= 0 and f[2] + tokens > tpm then
    refused = 'tpm'
  elseif budget >= 0 and spent + f[6] + cost > budget then
    refused = 'budget'
  end
  if refused then
    local out = {'no', now, i, refused, spent, f[6]}
    for k = 1, n do
      for m = 1, 4 do table.insert(out, found[k][m]) end
    end
    return line(out)
  end
end
local rq_limit, rq_left, rq_oldest, tk_limit, tk_left, tk_oldest = -1, 0, 0, -1, 0, 0
for i = 1, n do
  local w, l, a = KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1]
  redis.call('ZADD', l, now + lease_ms, lease)
  if cost > 0 then
    redis.call('HSET', a, lease, cost)
    redis.call('HINCRBY', a, '_total', cost)
  end
  local first_of_second = redis.call('HINCRBY', w, 'r' .. second, 1) == 1
  redis.call('HINCRBY', w, 't' .. second, tokens)
  redis.call('HINCRBY', w, 'R', 1)
  redis.call('HINCRBY', w, 'T', tokens)
  if first_of_second then  -- the window is made or gains a second: it outlives it by a minute
    redis.call('HSETNX', w, 'o', second)
    redis.call('PEXPIRE', w, 120000)
  end
  redis.call('PEXPIRE', l, lease_ms + 60000)
  redis.call('PEXPIRE', a, lease_ms + 60000)
  -- the tightest requests and tokens limits (the first of equals), for the response's headers
  local f = found[i]
  local rpm, tpm = tonumber(ARGV[4 * i - 3]), tonumber(ARGV[4 * i - 2])
  if rpm >= 0 and (rq_limit < 0 or rpm - f[1] - 1 < rq_left) then
    rq_limit, rq_left, rq_oldest = rpm, rpm - f[1] - 1, f[3] >= 0 and f[3] or second
  end
  if tpm >= 0 and (tk_limit < 0 or tpm - f[2] - tokens < tk_left) then
    tk_limit, tk_left, tk_oldest = tpm, tpm - f[2] - tokens, f[4] >= 0 and f[4] or second
  end
end
local function rate(limit, left, oldest)
  if limit < 0 then return '- - -' end
  return string.format('%d %d %d', limit, math.max(left, 0), math.max((oldest + 60) * 1000 - now, 0))
end
return 'ok ' .. string.format('%d', second) .. ' ' .. rate(rq_limit, rq_left, rq_oldest) .. ' '
  .. rate(tk_limit, tk_left, tk_oldest)
"""
)

SETTLE = """
-- Releases, any number. KEYS: w, l, a, s of every subject of every release, in order. ARGV: one
-- per release, "<lease> <second it was counted in> <token correction> <cost> <number of subjects>".
-- The spent amount grows only where it exists: absent, it is seeded from the ledger, which has it.
local k = 0
for j = 1, #ARGV do
  local lease, second, delta, cost, n = string.match(ARGV[j], '^(.+) (%d+) (%-?%d+) (%-?%d+) (%d+)$')
  delta, cost = tonumber(delta), tonumber(cost)
  for i = 1, tonumber(n) do
    local w, l, a, s = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
    k = k + 4
    redis.call('ZREM', l, lease)
    local amount = redis.call('HGET', a, lease)
    if amount then
      redis.call('HINCRBY', a, '_total', -tonumber(amount))
      redis.call('HDEL', a, lease)
    end
    if cost > 0 and redis.call('EXISTS', s) == 1 then
      redis.call('INCRBY', s, cost)
    end
    if delta ~= 0 and redis.call('HEXISTS', w, 't' .. second) == 1 then
      redis.call('HINCRBY', w, 't' .. second, delta)
      redis.call('HINCRBY', w, 'T', delta)
    end
  end
end
return 1
"""

RENEW = """
-- KEYS: l, a per held lease. ARGV: lease_ms, then one lease per pair of keys.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
for i = 1, #KEYS / 2 do
  local l, a, lease = KEYS[2 * i - 1], KEYS[2 * i], ARGV[i + 1]
  if redis.call('ZSCORE', l, lease) then
    redis.call('ZADD', l, 'XX', now + lease_ms, lease)
    redis.call('PEXPIRE', l, lease_ms + 60000)
    redis.call('PEXPIRE', a, lease_ms + 60000)
  end
end
return 1
"""

STATE = (
    COMMON
    + """
-- KEYS: w, l, a, s of one subject: requests, tokens, in flight, reserved, spent (-1: not seeded).
local f = sweep(KEYS[1], KEYS[2], KEYS[3])
return {f[1], f[2], f[5], f[6], tonumber(redis.call('GET', KEYS[4]) or '-1')}
"""
)
