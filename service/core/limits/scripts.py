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

Every script run costs Redis's time, on its one thread, for every request of every gateway process:
counted by callgrind on a Redis 7.0 (``python -m bench.redis_scripts``), a ``redis.call`` costs some
3-15k instructions, and so does the Lua around it (``tonumber`` of a text some 1.5k, ``string.format``
1.8k, a table or a closure 1-1.5k, where a comparison costs a hundred). So the scripts make few calls: a
window's sums and the current second's counts are read in one ``HMGET`` and written back in one ``HSET``
(the script is atomic, so what it read is what it adds to), a lease carries its own amount, so that
releasing it is one ``ZREM`` and the amounts need no table of their own, and what the leases reserve is
read with the spent amount in one ``MGET``. And they convert each figure once: text becomes a number by
arithmetic (``x + 0``, cheaper than ``tonumber``), a figure Redis takes as text is passed on as the text
it came as, and only the release that writes a mark reads the clock.
"""

from __future__ import annotations

CLOCK = """
local clock = redis.call('TIME')
local second = clock[1] + 0
local now = second * 1000 + math.floor(clock[2] / 1000)
"""

MARK = """
-- a mark in the subject's set of marks (l .. 'x', kept an hour from the last one written): a lease
-- swept as expired, whose release, when it comes, still records what the request cost, once; or a
-- release counted without its lease. ``now`` is read here when the script has not read it yet.
local function mark(l, members)
  if not now then
    local clock = redis.call('TIME')
    now = clock[1] * 1000 + math.floor(clock[2] / 1000)
  end
  local x, at = l .. 'x', string.format('%d', now)
  for i = 1, #members, 500 do
    local scored = {}
    for j = i, math.min(i + 499, #members) do
      scored[#scored + 1] = at
      scored[#scored + 1] = members[j]
    end
    redis.call('ZADD', x, unpack(scored))
  end
  redis.call('ZREMRANGEBYSCORE', x, '-inf', string.format('(%d', now - 3600000))
  redis.call('PEXPIRE', x, '3600000')
end
"""

COMMON = (
    CLOCK
    + """
local first = second - 59
-- numbers handed to redis.call are written out with "%.17g" each time, more slowly than
-- string.format writes them: the ones used more than once are written once, as strings
local now_s, r_now, t_now = string.format('%d', now), 'r' .. clock[1], 't' .. clock[1]
"""
    + MARK
    + """
-- the leases that expired: gone, what they reserved given back, and each marked
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

-- the window of the last 60 seconds: requests, tokens, o, this second's requests, this second's
-- tokens. ``o`` is the oldest second holding requests (false: the window is empty), kept so by
-- every script that trims the window, so it is also where room for requests comes back. Numbers
-- Redis gave as text are made numbers by arithmetic (cheaper than tonumber).
local function window(w)
  local meta = redis.call('HMGET', w, 'o', 'R', 'T', r_now, t_now)
  local o, r, t = meta[1] and meta[1] + 0, (meta[2] or 0) + 0, (meta[3] or 0) + 0
  local rs, ts = (meta[4] or 0) + 0, (meta[5] or 0) + 0
  if o and o < first then
    local s = o
    if first - o < 60 then
      while s < first do  -- the seconds that left the window since it was last trimmed
        local old = redis.call('HMGET', w, 'r' .. s, 't' .. s)
        if old[1] or old[2] then
          r = r - (old[1] or 0)
          t = t - (old[2] or 0)
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
      o, r, t, rs, ts = false, 0, 0, 0, 0
    end
  end
  return r, t, o, rs, ts
end

-- the oldest second of the window holding tokens (-1: none), given its tokens and ``o``
local function oldest_tokens(w, t, o)
  if t > 0 and o then
    for s = o, second do
      if (tonumber(redis.call('HGET', w, 't' .. s)) or 0) > 0 then return s end
    end
  end
  return -1
end
"""
)

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
-- limit), then lease_ms, then how long the keys of the leases are kept (lease_ms + a minute), then
-- the request's own "<lease> <cost> <tokens>" (one argument, written at once; "<lease> <cost>" is
-- the lease as the set of leases holds it and its release names it). The answer is one line:
--   ok <second> then for requests and for tokens the tightest limit (this request counted):
--      <limit> <remaining> <reset> (as the x-ratelimit-reset-* header writes it), or - - - without
--      such a limit
--   no <now ms> <subject> <limit kind> <spent> <reserved> then per subject the four, as found
--   seed <subject>: its budget period's spent amount is missing
-- Every Lua operation costs Redis's time on every request: each figure is read or converted once.
local n = #KEYS / 4
local lease_ms, keep = ARGV[4 * n + 1] + 0, ARGV[4 * n + 2]
local member, cost_s, tokens = string.match(ARGV[4 * n + 3], '^(.+ (%d+)) (%d+)$')
local cost = cost_s + 0
tokens = tokens + 0
-- per subject: requests, tokens, oldest second with requests (-1), oldest with tokens (-1), this
-- second's requests, its tokens, o, then its limits rpm, tpm, concurrent, budget, then spent and
-- reserved (a budget only)
local found = {}
for i = 1, n do  -- every subject read first (a refusal's headers tell the tightest limit of all)
  local base = 4 * (i - 1)
  local w, r = KEYS[base + 1], KEYS[base + 3]
  expire(KEYS[base + 2], r)
  local wr, wt, o, rs, ts = window(w)
  local tpm, budget = ARGV[base + 2] + 0, ARGV[base + 4] + 0
  local spent, reserved = false, false
  if budget >= 0 then
    local values = redis.call('MGET', KEYS[base + 4], r)
    if not values[1] then
      return 'seed ' .. i
    end
    spent, reserved = values[1] + 0, (values[2] or 0) + 0
  end
  found[i] = {wr, wt, wr > 0 and o or -1, tpm >= 0 and oldest_tokens(w, wt, o) or -1, rs, ts, o,
    ARGV[base + 1] + 0, tpm, ARGV[base + 3] + 0, budget, spent, reserved}
end
for i = 1, n do
  local f = found[i]
  local rpm, tpm, concurrent, budget = f[8], f[9], f[10], f[11]
  local refused = false
  if concurrent >= 0 and redis.call('ZCARD', KEYS[4 * i - 2]) >= concurrent then
    refused = 'concurrent'
  elseif rpm >= 0 and f[1] + 1 > rpm then
    refused = 'rpm'
  elseif tpm >= 0 and f[2] + tokens > tpm then
    refused = 'tpm'
  elseif budget >= 0 and cost > 0 and f[12] + f[13] + cost > budget then  -- what reserves nothing spends nothing
    refused = 'budget'
  end
  if refused then
    local out = {'no', string.format('%d %d', now, i), refused, string.format('%d %d', f[12] or 0, f[13] or 0)}
    for k = 1, n do
      local g = found[k]
      out[#out + 1] = string.format('%d %d %d %d', g[1], g[2], g[3], g[4])
    end
    return table.concat(out, ' ')
  end
end
local rq_limit, rq_left, rq_oldest, tk_limit, tk_left, tk_oldest = -1, 0, 0, -1, 0, 0
local held_until = string.format('%d', now + lease_ms)
for i = 1, n do
  local base = 4 * (i - 1)
  local w, l, r = KEYS[base + 1], KEYS[base + 2], KEYS[base + 3]
  local f = found[i]
  redis.call('ZADD', l, held_until, member)
  redis.call('PEXPIRE', l, keep)
  if cost > 0 then
    if f[13] then  -- read above: written with its life in one call
      redis.call('SET', r, string.format('%d', f[13] + cost), 'PX', keep)
    else
      redis.call('INCRBY', r, cost_s)
      redis.call('PEXPIRE', r, keep)
    end
  end
  local rs, ts = string.format('%d', f[5] + 1), string.format('%d', f[6] + tokens)
  local sr, st = string.format('%d', f[1] + 1), string.format('%d', f[2] + tokens)
  if f[7] then
    redis.call('HSET', w, r_now, rs, t_now, ts, 'R', sr, 'T', st)
  else  -- a new window: it starts now
    redis.call('HSET', w, r_now, rs, t_now, ts, 'R', sr, 'T', st, 'o', clock[1])
  end
  if f[5] == 0 then  -- the window gains a second: it outlives it by a minute
    redis.call('PEXPIRE', w, '120000')
  end
  -- the tightest requests and tokens limits (the first of equals), for the response's headers
  local rpm, tpm = f[8], f[9]
  if rpm >= 0 and (rq_limit < 0 or rpm - f[1] - 1 < rq_left) then
    rq_limit, rq_left, rq_oldest = rpm, rpm - f[1] - 1, f[3] >= 0 and f[3] or second
  end
  if tpm >= 0 and (tk_limit < 0 or tpm - f[2] - tokens < tk_left) then
    tk_limit, tk_left, tk_oldest = tpm, tpm - f[2] - tokens, f[4] >= 0 and f[4] or second
  end
end
local requests, tokens_left = '- - -', '- - -'
if rq_limit >= 0 then
  requests = string.format('%d %d ', rq_limit, math.max(rq_left, 0))
    .. duration(math.max((rq_oldest + 60) * 1000 - now, 0))
end
if tk_limit >= 0 then
  tokens_left = string.format('%d %d ', tk_limit, math.max(tk_left, 0))
    .. duration(math.max((tk_oldest + 60) * 1000 - now, 0))
end
return 'ok ' .. clock[1] .. ' ' .. requests .. ' ' .. tokens_left
"""
)

SETTLE = (
    "\nlocal now  -- read by mark(), on the paths that write a mark\n"
    + MARK
    + """
-- Releases, any number. KEYS: w, l, r, s of every subject of every release, in order. ARGV: one per
-- release, "<lease> <reserved> <second it was counted in> <token correction> <cost> <number of
-- subjects>" (second 0: admitted unchecked while Redis was away, with no lease). A release counts
-- once, however often it is sent (a batch whose reply was lost with the connection is sent again):
-- when it takes its lease away; when its lease was swept as expired (which gave back its amount),
-- when it takes the mark the sweep left; when its lease is gone with what the leases reserve (the
-- keys expired, or Redis lost them), or it was admitted unchecked, when it is the first to leave a
-- mark that it counted. Otherwise an earlier send counted it. The spent amount grows only where it
-- exists: absent, it is seeded from the ledger, which has it. The figures stay text where Redis
-- takes text (each is written as the gateway wrote it, a whole number without leading zeros).
local k = 0
for j = 1, #ARGV do
  local member, reserved, second, delta, cost, n =
    string.match(ARGV[j], '^(.+ (%d+)) (%d+) (%-?%d+) (%-?%d+) (%d+)$')
  local costs = cost ~= '0' and string.sub(cost, 1, 1) ~= '-'
  for i = 1, n + 0 do
    local w, l, r, s = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
    k = k + 4
    local counts
    if redis.call('ZREM', l, member) == 1 then
      counts = true
      if reserved ~= '0' then
        redis.call('DECRBY', r, reserved)
      end
    elseif second ~= '0' and redis.call('ZREM', l .. 'x', member) == 1 then
      counts = true
    elseif second == '0' or (reserved ~= '0' and redis.call('EXISTS', r) == 0) then
      counts = redis.call('ZSCORE', l .. 'x', member .. ' counted') == false
      if counts then
        mark(l, {member .. ' counted'})
      end
    end
    if counts and costs and redis.call('EXISTS', s) == 1 then
      redis.call('INCRBY', s, cost)
    end
    if counts and delta ~= '0' then
      local found = redis.call('HMGET', w, 't' .. second, 'T')
      if found[1] then
        redis.call('HSET', w, 't' .. second, string.format('%d', found[1] + delta),
          'T', string.format('%d', (found[2] or 0) + delta))
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
local requests, tokens = window(KEYS[1])
local values = redis.call('MGET', KEYS[3], KEYS[4])
return {requests, tokens, redis.call('ZCARD', KEYS[2]), tonumber(values[1] or '0'), tonumber(values[2] or '-1')}
"""
)
