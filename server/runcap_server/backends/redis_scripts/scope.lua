-- runcap parent scope (API key, user or team): every operation on one scope,
-- atomically, in one slot.
--
-- The semantics are those of runcap_server/ledger/scopes.py; the conformance
-- tests hold both to the same answers. A hold counts in the lifetime window
-- "l", the UTC day "d:<epoch day>" and the UTC month "m:<epoch month>" current
-- when it was made.
--
-- KEYS: 1 limits HASH (period -> limit), 2 window totals HASH ("<window>:c|r|o|n"
--       -> committed, reserved, overrun, active), 3 holds HASH (hold id ->
--       record), 4 expiry ZSET of held ids (score = expires_ms), 5 ZSET of
--       settled ids (score = settled ms): pruned SETTLED_RETENTION_MS after
-- ARGV: 1 operation, 2 now_ms ("" = the server's TIME; tests only), 3 expiry
--       batch, 4.. operation args
--
-- Replies are flat arrays beginning with "OK". Nothing is written before every
-- check has passed; numbers are written with %d (Lua numbers are doubles).

local LIM, WIN, HOLDS, X, DONE = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op = ARGV[1]
local batch = tonumber(ARGV[3])

local HELD, COMMITTED, RELEASED, EXPIRED, LATE_COMMITTED, BLOCKED = 1, 2, 3, 4, 5, 6
local LIFETIME, DAILY, MONTHLY = 1, 2, 3
local DAY_MS = 86400000
-- As scopes.SETTLED_HOLD_RETENTION_MS and scopes.PRUNE_BATCH (a test holds them equal).
local SETTLED_RETENTION_MS = 3600000
local PRUNE_BATCH = 10

-- The windows a hold made at `ms` counts in: lifetime, day, month. The month
-- is computed from the day number (Hinnant's civil-from-days), as scopes.py does.
local function windows_at(ms)
  local day = math.floor(ms / DAY_MS)
  local z = day + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return {'l', 'd:' .. num(day), 'm:' .. num(y * 12 + m - 1)}
end

-- Hold records: "amount|status|created|windows (;)|expires|actual|overrun|settled|period".
local function decode(id, s)
  local f = {}
  for part in string.gmatch(s, '([^|]*)|?') do
    f[#f + 1] = part
    if #f == 9 then break end
  end
  local windows = {}
  for w in string.gmatch(f[4], '[^;]+') do windows[#windows + 1] = w end
  return {
    id = id, amount = tonumber(f[1]), status = tonumber(f[2]), created = tonumber(f[3]),
    windows = windows, expires = tonumber(f[5]), actual = tonumber(f[6]),
    overrun = tonumber(f[7]), settled = tonumber(f[8]), period = tonumber(f[9]),
  }
end

local function encode(h)
  return table.concat({num(h.amount), num(h.status), num(h.created), table.concat(h.windows, ';'),
    opt(h.expires), opt(h.actual), num(h.overrun), opt(h.settled), opt(h.period)}, '|')
end

local txn = {now = 0, totals = {}, holds = {}, order = {}}

local function totals(w)
  if not txn.totals[w] then
    local v = redis.call('HMGET', WIN, w .. ':c', w .. ':r', w .. ':o', w .. ':n')
    txn.totals[w] = {c = tonumber(v[1]) or 0, r = tonumber(v[2]) or 0, o = tonumber(v[3]) or 0,
      n = tonumber(v[4]) or 0}
  end
  return txn.totals[w]
end

local function put(h)
  if not txn.holds[h.id] then txn.order[#txn.order + 1] = h.id end
  txn.holds[h.id] = h
end

local function release(h, status)
  for _, w in ipairs(h.windows) do
    local t = totals(w)
    t.r = t.r - h.amount
    t.n = t.n - 1
  end
  h.status = status
  h.settled = txn.now
  put(h)
end

local function open_scope()
  txn.now = now_ms()
  local due = redis.call('ZRANGEBYSCORE', X, '-inf', num(txn.now), 'LIMIT', 0, batch)
  if #due > 0 then
    local records = redis.call('HMGET', HOLDS, unpack(due))
    for i, id in ipairs(due) do release(decode(id, records[i]), EXPIRED) end
  end
end

local function find(id)
  if txn.holds[id] then return txn.holds[id] end
  local s = redis.call('HGET', HOLDS, id)
  if not s then return nil end
  local h = decode(id, s)
  if h.status == HELD and h.expires and h.expires <= txn.now then release(h, EXPIRED) end
  return h
end

local function apply()
  for w, t in pairs(txn.totals) do
    redis.call('HSET', WIN, w .. ':c', num(t.c), w .. ':r', num(t.r), w .. ':o', num(t.o),
      w .. ':n', num(t.n))
  end
  for _, id in ipairs(txn.order) do
    local h = txn.holds[id]
    redis.call('HSET', HOLDS, id, encode(h))
    if h.status == HELD then
      redis.call('ZADD', X, num(h.expires), id)
    else
      redis.call('ZREM', X, id)
      redis.call('ZADD', DONE, num(h.settled or txn.now), id)
    end
  end
  -- A settled record only answers retries and re-driven settlements, which come
  -- within seconds: forget the oldest, a few per operation.
  local old = redis.call('ZRANGEBYSCORE', DONE, '-inf', '(' .. num(txn.now - SETTLED_RETENTION_MS),
    'LIMIT', 0, PRUNE_BATCH)
  if #old > 0 then
    redis.call('HDEL', HOLDS, unpack(old))
    redis.call('ZREM', DONE, unpack(old))
  end
end

local function outcome(h, replayed)
  return {'OK', replayed and '1' or '0', num(h.status), opt(h.period)}
end

local ops = {}

-- ARGV 4..: hold id, amount, ttl ms. Replies replayed, status, blocking period.
function ops.hold()
  local id, amount, ttl = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
  open_scope()
  local prev = find(id)
  if prev then
    apply()
    return outcome(prev, true)
  end
  local windows = windows_at(txn.now)
  local limits = redis.call('HMGET', LIM, num(DAILY), num(MONTHLY), num(LIFETIME))
  local order = {{DAILY, windows[2]}, {MONTHLY, windows[3]}, {LIFETIME, windows[1]}}
  local h = {id = id, amount = amount, status = BLOCKED, created = txn.now, windows = windows,
    overrun = 0, settled = txn.now}
  for i, check in ipairs(order) do
    local limit = tonumber(limits[i])
    local t = totals(check[2])
    if limit and t.c + t.r + amount > limit then
      h.period = check[1]
      break
    end
  end
  if not h.period then
    h.status = HELD
    h.settled = nil
    h.expires = txn.now + ttl
    for _, w in ipairs(windows) do
      local t = totals(w)
      t.r = t.r + amount
      t.n = t.n + 1
    end
  end
  put(h)
  apply()
  return outcome(h, false)
end

-- ARGV 4..: hold id, actual ("" releases). Replies the hold's status after.
-- The run's record is the truth: a commit always records the money, late when
-- the hold expired, is unknown here, or was blocked here (an advisory run holds
-- what its parents block).
function ops.settle()
  local id, actual = ARGV[4], tonumber(ARGV[5])
  open_scope()
  local h = find(id)
  if not actual then
    if h and h.status == HELD then release(h, RELEASED) end
    apply()
    return {'OK', num(h and h.status or RELEASED)}
  end
  if not h then
    -- Never held here (or forgotten): the money was spent all the same.
    h = {id = id, amount = 0, status = EXPIRED, created = txn.now, windows = windows_at(txn.now),
      overrun = 0}
  elseif h.status == BLOCKED then
    h.status = EXPIRED
  end
  if h.status == HELD or h.status == EXPIRED then
    local late = h.status == EXPIRED
    if not late then release(h, COMMITTED) end
    local overrun = late and actual or math.max(0, actual - h.amount)
    for _, w in ipairs(h.windows) do
      local t = totals(w)
      t.c = t.c + actual
      t.o = t.o + overrun
    end
    h.status = late and LATE_COMMITTED or COMMITTED
    h.actual = actual
    h.overrun = overrun
    h.settled = txn.now
    put(h)
  end
  apply()
  return {'OK', num(h.status)}
end

-- Replies the number of holds released and the next expiry ("" if none).
function ops.expire()
  open_scope()
  local released = #txn.order
  apply()
  local next_due = redis.call('ZRANGE', X, 0, 0, 'WITHSCORES')
  return {'OK', num(released), next_due[2] or ''}
end

-- Replies now, then per period (lifetime, daily, monthly): window, limit or
-- "", committed, reserved, overrun, active.
function ops.view()
  open_scope()
  apply()
  local windows = windows_at(txn.now)
  local limits = redis.call('HMGET', LIM, num(LIFETIME), num(DAILY), num(MONTHLY))
  local reply = {'OK', num(txn.now)}
  for i, w in ipairs(windows) do
    local t = totals(w)
    for _, v in ipairs({w, limits[i] or '', num(t.c), num(t.r), num(t.o), num(t.n)}) do
      reply[#reply + 1] = v
    end
  end
  return reply
end

-- ARGV 4..: period, limit ("" clears).
function ops.set_limit()
  if ARGV[5] == '' then
    redis.call('HDEL', LIM, ARGV[4])
  else
    redis.call('HSET', LIM, ARGV[4], ARGV[5])
  end
  return ops.view()
end

local handler = ops[op]
if not handler then return {'ERR', 'UNKNOWN_OPERATION', op} end
return handler()
