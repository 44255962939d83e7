"""The Lua scripts the Redis limiter runs: each one atomic on the server, whatever the number of
gateway processes and replicas calling it.

Keys per subject (a team or a key): ``…:m`` a hash of one-second buckets (``r<second>`` requests,
``t<second>`` tokens) over the last 60 seconds, with their sums (``R``, ``T``) and the oldest second
holding requests (``o``), so that a check reads only the seconds that left the window since the last,
and the requests' reset is ``o`` + 60 s; ``…:l`` a sorted set of leases (``"<lease> <amount
reserved>"``) scored by their expiry (milliseconds); ``…:lx`` marks, scored by when they were
written and kept an hour: the leases swept as expired whose release has not come yet, and the
releases counted without a lease (``"… counted"``); ``…:r`` the sum of what the leases reserve
against the budget; ``…:s:<period>`` the micro-dollars settled in a budget period. Expired leases are
swept by every script that reads them, so a process that died leaves nothing held for longer than its
leases' life. Time is the Redis server's (``TIME``), one clock for every replica.

Every ``redis.call`` costs Redis's time (0.4-2 µs each on the bench machine, a write into the window's
hash several), so the scripts make few: a window's sums and the current second's counts are read in one
``HMGET`` and written back in one ``HSET`` (the script is atomic, so what it read is what it adds to),
a lease carries its own amount, so that releasing it is one ``ZREM`` and the amounts need no table of
their own, and what the leases reserve is read with the spent amount in one ``MGET``.
"""

from __future__ import annotations

COMMON = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local second = tonumber(clock[1])
local first = second - 59
-- numbers handed to redis.call are written out with "%.17g" each time: the ones used more than
-- once are written once, as strings
local now_s, r_now, t_now = string.format('%d', now), 'r' .. clock[1], 't' .. clock[1]

-- the leases that expired: gone, and what they reserved given back. Each is kept in the set of marks
-- (l .. 'x', kept an hour from the last one written; SETTLE writes there too): its release, when it
-- comes, still records what the request cost, once.
local function mark(l, members)
  local x = l .. 'x'
  for i = 1, #members, 500 do
    local scored = {}
    for j = i, math.min(i + 499, #members) do
      table.insert(scored, now_s)
      table.insert(scored, members[j])
    end
    redis.call('ZADD', x, unpack(scored))
  end
  redis.call('ZREMRANGEBYSCORE', x, '-inf', string.format('(%d', now - 3600000))
  redis.call('PEXPIRE', x, '3600000')
end
local function expire(l, r)
  local gone = redis.call('ZRANGEBYSCORE', l, '-inf', now_s)
  if #gone > 0 then
    local freed = 0
    for _, member in ipairs(gone) do
      freed = freed + (tonumber(string.match(member, ' (%d+)$')) or 0)
    end
    if freed > 0 then
      redis.call('DECRBY', r, freed)
    end
    redis.call('ZREMRANGEBYSCORE', l, '-inf', now_s)
    mark(l, gone)
  end
end

-- the window of the last 60 seconds: {requests, tokens, o, this second's requests, this second's
-- tokens}. ``o`` is the oldest second holding requests (nil: the window is empty), kept so by
-- every script that trims the window, so it is also where room for requests comes back.
local function window(w)
  local meta = redis.call('HMGET', w, 'o', 'R', 'T', r_now, t_now)
  local o, r, t = tonumber(meta[1]), tonumber(meta[2]) or 0, tonumber(meta[3]) or 0
  local rs, ts = tonumber(meta[4]) or 0, tonumber(meta[5]) or 0
  if o and o < first then
    local s = o
    if first - o < 60 then
      while s < first do  -- the seconds that left the window since it was last trimmed
        local old = redis.call('HMGET', w, 'r' .. s, 't' .. s)
        if old[1] or old[2] then
          r = r - (tonumber(old[1]) or 0)
          t = t - (tonumber(old[2]) or 0)
          redis.call('HDEL', w, 'r' .. s, 't' .. s)
        end
        s = s + 1
      end
    end
    if r > 0 and first - o < 60 then
      while s < second and redis.call('HEXISTS', w, 'r' .. s) == 0 do s = s + 1 end
      o = s
      redis.call('HSET', w, 'o', string.format('%d', o), 'R', string.format('%d', r), 'T', string.format('%d', t))
    else  -- nothing left in it
      redis.call('DEL', w)
      o, r, t, rs, ts = nil, 0, 0, 0, 0
    end
  end
  return {r, t, o, rs, ts}
end

-- the oldest second of the window holding tokens (-1: none)
local function oldest_tokens(w, f)
  if f[2] > 0 and f[3] then
    for s = f[3], second do
      if (tonumber(redis.call('HGET', w, 't' .. s)) or 0) > 0 then return s end
    end
  end
  return -1
end
"""

DURATION = """
-- when the limit resets, as OpenAI writes it (20ms, 1.5s, 1m0s; outcome.duration in the gateway)
local function duration(ms)
  if ms < 1000 then return string.format('%dms', ms) end
  if ms < 60000 then
    local whole, millis = math.floor(ms / 1000), ms % 1000
    if millis == 0 then return string.format('%ds', whole) end
    return (string.gsub(string.format('%d.%03d', whole, millis), '0+$', '')) .. 's'
  end
  local seconds = math.floor((ms + 500) / 1000)
  return string.format('%dm%ds', math.floor(seconds / 60), seconds % 60)
end
"""

ADMIT = (
    COMMON
    + DURATION
    + """
-- KEYS: w, l, r, s per subject. ARGV: per subject rpm, tpm, concurrent, budget (-1: no such
-- limit), then lease_ms, then the request's own "<lease> <tokens> <cost>" (one argument, written
-- at once). The answer is one line of words:
--   ok <second> then for requests and for tokens the tightest limit (this request counted):
--      <limit> <remaining> <reset> (as the x-ratelimit-reset-* header writes it), or - - - without
--      such a limit
--   no <now ms> <subject> <limit kind> <spent> <reserved> then per subject the four, as found
--   seed <subject>: its budget period's spent amount is missing
local n = #KEYS / 4
local lease_ms = tonumber(ARGV[4 * n + 1])
local member, tokens, cost_s = string.match(ARGV[4 * n + 2], '^(.+) (%d+) (%d+)$')
member = member .. ' ' .. cost_s  -- the lease with its amount, as its release names it
local cost = tonumber(cost_s)
tokens = tonumber(tokens)
local function line(words)
  for i = 1, #words do
    if type(words[i]) == 'number' then words[i] = string.format('%d', words[i]) end
  end
  return table.concat(words, ' ')
end
local found, spent, reserved = {}, {}, {}
for i = 1, n do  -- every subject read first (a refusal's headers tell the tightest limit of all)
  local base = 4 * (i - 1)
  local w, l, r = KEYS[base + 1], KEYS[base + 2], KEYS[base + 3]
  expire(l, r)
  local f = window(w)
  local oldest_t = tonumber(ARGV[base + 2]) >= 0 and oldest_tokens(w, f) or -1
  found[i] = {f[1], f[2], f[1] > 0 and f[3] or -1, oldest_t, f[4], f[5], f[3]}
  if tonumber(ARGV[base + 4]) >= 0 then
    local values = redis.call('MGET', KEYS[base + 4], r)
    if not values[1] then
      return line({'seed', i})
    end
    spent[i], reserved[i] = tonumber(values[1]), tonumber(values[2]) or 0
  end
end
for i = 1, n do
  local base = 4 * (i - 1)
  local rpm, tpm = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local concurrent, budget = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
  local f = found[i]
  local refused = false
  if concurrent >= 0 and redis.call('ZCARD', KEYS[base + 2]) >= concurrent then
    refused = 'concurrent'
  elseif rpm >= 0 and f[1] + 1 > rpm then
    refused = 'rpm'
  elseif tpm >= 0 and f[2] + tokens > tpm then
    refused = 'tpm'
  elseif budget >= 0 and spent[i] + reserved[i] + cost > budget then
    refused = 'budget'
  end
  if refused then
    local out = {'no', now, i, refused, spent[i] or 0, reserved[i] or 0}
    for k = 1, n do
      for m = 1, 4 do table.insert(out, found[k][m]) end
    end
    return line(out)
  end
end
local rq_limit, rq_left, rq_oldest, tk_limit, tk_left, tk_oldest = -1, 0, 0, -1, 0, 0
local held_until, keep = string.format('%d', now + lease_ms), string.format('%d', lease_ms + 60000)
for i = 1, n do
  local base = 4 * (i - 1)
  local w, l, r = KEYS[base + 1], KEYS[base + 2], KEYS[base + 3]
  local f = found[i]
  redis.call('ZADD', l, held_until, member)
  redis.call('PEXPIRE', l, keep)
  if cost > 0 then
    if reserved[i] then  -- read above: written with its life in one call
      redis.call('SET', r, string.format('%d', reserved[i] + cost), 'PX', keep)
    else
      redis.call('INCRBY', r, cost_s)
      redis.call('PEXPIRE', r, keep)
    end
  end
  local counts = {r_now, string.format('%d', f[5] + 1), t_now, string.format('%d', f[6] + tokens),
    'R', string.format('%d', f[1] + 1), 'T', string.format('%d', f[2] + tokens)}
  if not f[7] then  -- a new window: it starts now
    table.insert(counts, 'o')
    table.insert(counts, clock[1])
  end
  redis.call('HSET', w, unpack(counts))
  if f[5] == 0 then  -- the window gains a second: it outlives it by a minute
    redis.call('PEXPIRE', w, '120000')
  end
  -- the tightest requests and tokens limits (the first of equals), for the response's headers
  local rpm, tpm = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  if rpm >= 0 and (rq_limit < 0 or rpm - f[1] - 1 < rq_left) then
    rq_limit, rq_left, rq_oldest = rpm, rpm - f[1] - 1, f[3] >= 0 and f[3] or second
  end
  if tpm >= 0 and (tk_limit < 0 or tpm - f[2] - tokens < tk_left) then
    tk_limit, tk_left, tk_oldest = tpm, tpm - f[2] - tokens, f[4] >= 0 and f[4] or second
  end
end
local function rate(limit, left, oldest)
  if limit < 0 then return '- - -' end
  return string.format('%d %d ', limit, math.max(left, 0)) .. duration(math.max((oldest + 60) * 1000 - now, 0))
end
return 'ok ' .. string.format('%d', second) .. ' ' .. rate(rq_limit, rq_left, rq_oldest) .. ' '
  .. rate(tk_limit, tk_left, tk_oldest)
"""
)

SETTLE = (
    COMMON
    + """
-- Releases, any number. KEYS: w, l, r, s of every subject of every release, in order. ARGV: one per
-- release, "<lease> <reserved> <second it was counted in> <token correction> <cost> <number of
-- subjects>" (second 0: admitted unchecked while Redis was away, with no lease). A release counts
-- once, however often it is sent (a batch whose reply was lost with the connection is sent again):
-- when it takes its lease away; when its lease was swept as expired (which gave back its amount),
-- when it takes the mark the sweep left; when its lease is gone with what the leases reserve (the
-- keys expired, or Redis lost them), or it was admitted unchecked, when it is the first to leave a
-- mark that it counted. Otherwise an earlier send counted it. The spent amount grows only where it
-- exists: absent, it is seeded from the ledger, which has it.
local k = 0
for j = 1, #ARGV do
  local member, reserved, second, delta, cost, n =
    string.match(ARGV[j], '^(.+ (%d+)) (%d+) (%-?%d+) (%-?%d+) (%d+)$')
  reserved, delta, cost = tonumber(reserved), tonumber(delta), tonumber(cost)
  for i = 1, tonumber(n) do
    local w, l, r, s = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
    k = k + 4
    local counts
    if redis.call('ZREM', l, member) == 1 then
      counts = true
      if reserved > 0 then
        redis.call('DECRBY', r, reserved)
      end
    elseif second ~= '0' and redis.call('ZREM', l .. 'x', member) == 1 then
      counts = true
    elseif second == '0' or (reserved > 0 and redis.call('EXISTS', r) == 0) then
      counts = redis.call('ZSCORE', l .. 'x', member .. ' counted') == false
      if counts then
        mark(l, {member .. ' counted'})
      end
    end
    if counts and cost > 0 and redis.call('EXISTS', s) == 1 then
      redis.call('INCRBY', s, cost)
    end
    if counts and delta ~= 0 then
      local found = redis.call('HMGET', w, 't' .. second, 'T')
      if found[1] then
        redis.call('HSET', w, 't' .. second, string.format('%d', tonumber(found[1]) + delta),
          'T', string.format('%d', (tonumber(found[2]) or 0) + delta))
      end
    end
  end
end
return 1
"""
)

RENEW = """
-- KEYS: l, r per held lease. ARGV: lease_ms, then one lease ("<lease> <reserved>") per pair of keys.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
for i = 1, #KEYS / 2 do
  local l, r, lease = KEYS[2 * i - 1], KEYS[2 * i], ARGV[i + 1]
  if redis.call('ZADD', l, 'XX', 'CH', now + lease_ms, lease) == 1 then
    redis.call('PEXPIRE', l, lease_ms + 60000)
    redis.call('PEXPIRE', r, lease_ms + 60000)
  end
end
return 1
"""

STATE = (
    COMMON
    + """
-- KEYS: w, l, r, s of one subject: requests, tokens, in flight, reserved, spent (-1: not seeded).
expire(KEYS[2], KEYS[3])
local f = window(KEYS[1])
local values = redis.call('MGET', KEYS[3], KEYS[4])
return {f[1], f[2], redis.call('ZCARD', KEYS[2]), tonumber(values[1] or '0'), tonumber(values[2] or '-1')}
"""
)
