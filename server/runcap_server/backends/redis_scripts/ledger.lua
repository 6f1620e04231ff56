-- runcap ledger: every operation on one run, atomically, in one slot.
--
-- The semantics are those of runcap_server/ledger/core.py (docs/semantics.md);
-- the conformance and stateful tests hold both to the same answers.
--
-- KEYS: 1 account HASH, 2 reservations HASH (id -> record), 3 expiry ZSET of
--       held ids (score = expires_ms), 4 change log STREAM (entry id = revision),
--       5 the run's shard channel (a doorbell for watchers; never read), 6 ZSET
--       of reservations whose parent scopes still await settlement (score =
--       when the run settled; the saga removes them, the sweeper re-drives them)
-- ARGV: 1 operation, 2 now_ms ("" = the server's TIME; tests only), 3 log
--       retention, 4 expiry batch, 5 closed-run retention ms, 6.. operation args
--
-- Replies are flat arrays: {"OK", ...} or {"ERR", reason, detail}. Nothing is
-- written before every check has passed. Lua numbers are doubles: every amount
-- is at most 2^53 - 1, and numbers are written with %d, never tostring.

local A, R, X, LOG, BELL, P = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local op = ARGV[1]
local retention = ARGV[3]
local batch = tonumber(ARGV[4])
local closed_retention_ms = tonumber(ARGV[5])
local MAX_MICROS = 9007199254740991

-- Enum values as in runcap.v1 (and ledger/types.py).
local OPEN, CLOSED, SUSPENDED = 1, 2, 3
local ALLOW, BLOCK = 1, 2
local WITHIN_BUDGET, INSUFFICIENT_BUDGET, RUN_CLOSED, RUN_SUSPENDED = 1, 2, 3, 6
local LIFETIME = 1
local HELD, COMMITTED, RELEASED, EXPIRED, LATE_COMMITTED, BLOCKED = 1, 2, 3, 4, 5, 6
local CREATED, RESERVED, EV_COMMITTED, REFUNDED, EV_EXPIRED, EV_CLOSED = 1, 2, 3, 4, 5, 6
local EV_SUSPENDED, EV_RESUMED = 7, 8

-- Reservation records: "amount|requested_ttl|status|reason|created|held|expires|actual|
-- overrun|settled|blocking scope|blocking period|fingerprint|pricing" (no field holds "|").
local function decode(id, s)
  local f = {}
  for part in string.gmatch(s, '([^|]*)|?') do
    f[#f + 1] = part
    if #f == 14 then break end
  end
  return {
    id = id, amount = tonumber(f[1]), requested_ttl = tonumber(f[2]), status = tonumber(f[3]),
    reason = tonumber(f[4]), created = tonumber(f[5]), held = tonumber(f[6]),
    expires = tonumber(f[7]), actual = tonumber(f[8]), overrun = tonumber(f[9]),
    settled = tonumber(f[10]), scope = f[11] or '', period = tonumber(f[12]),
    fingerprint = f[13] or '', pricing = f[14] or '',
  }
end

local function encode(r)
  return table.concat({num(r.amount), opt(r.requested_ttl), num(r.status), num(r.reason),
    num(r.created), num(r.held), opt(r.expires), opt(r.actual), num(r.overrun),
    opt(r.settled), r.scope or '', opt(r.period), r.fingerprint or '', r.pricing or ''}, '|')
end

local FIELDS = {'lim', 'com', 'res', 'ovr', 'act', 'rev', 'st', 'cr', 'cl', 'lab', 'ttl', 'dig',
  'pr', 'ak', 'us', 'tm', 'lin', 'np'}

local function load_account()
  local v = redis.call('HMGET', A, unpack(FIELDS))
  if not v[1] then return nil end
  return {
    lim = tonumber(v[1]), com = tonumber(v[2]), res = tonumber(v[3]), ovr = tonumber(v[4]),
    act = tonumber(v[5]), rev = tonumber(v[6]), st = tonumber(v[7]), cr = tonumber(v[8]),
    cl = tonumber(v[9]), lab = v[10], ttl = tonumber(v[11]), dig = v[12],
    pr = v[13] or '', ak = v[14] or '', us = v[15] or '', tm = v[16] or '', lin = v[17] or '',
    np = tonumber(v[18]) or 0,
  }
end

-- One operation's pending writes: applied only once nothing can fail any more.
local txn = {acc = nil, now = 0, res = {}, order = {}, changes = {}}

local function state(acc)
  return {num(acc.lim), num(acc.com), num(acc.res), num(acc.rev), num(acc.st), num(acc.act),
    num(acc.ovr), acc.dig}
end

local function put(r)
  if not txn.res[r.id] then txn.order[#txn.order + 1] = r.id end
  txn.res[r.id] = r
end

local function record(kind, r, amount, actual, overrun, late)
  local acc = txn.acc
  acc.rev = acc.rev + 1
  if r then put(r) end
  local rid = r and r.id or ''
  acc.dig = redis.sha1hex(table.concat({acc.dig, num(acc.rev), num(kind), rid, num(amount or 0),
    num(actual or 0), num(overrun or 0), late and '1' or '0'}, '|'))
  txn.changes[#txn.changes + 1] = {
    num(acc.rev) .. '-1',
    't', num(kind), 'r', rid, 'a', num(amount or 0), 'c', num(actual or 0),
    'o', num(overrun or 0), 'l', late and '1' or '0', 'ts', num(txn.now), 'd', acc.dig,
    'L', num(acc.lim), 'C', num(acc.com), 'R', num(acc.res), 'S', num(acc.st),
    'N', num(acc.act), 'O', num(acc.ovr),
  }
end

local function expire(r)
  r.status = EXPIRED
  r.settled = txn.now
  txn.acc.res = txn.acc.res - r.held
  txn.acc.act = txn.acc.act - 1
  record(EV_EXPIRED, r, r.held)
end

-- Start an operation on an existing run, with its due holds expired.
local function open_run()
  local acc = load_account()
  if not acc then return false end
  txn.acc = acc
  txn.now = now_ms()
  local due = redis.call('ZRANGEBYSCORE', X, '-inf', num(txn.now), 'LIMIT', 0, batch)
  if #due > 0 then
    local records = redis.call('HMGET', R, unpack(due))
    for i, id in ipairs(due) do
      expire(decode(id, records[i]))
    end
  end
  return true
end

-- The reservation as it stands in this operation (expired if it was due).
local function reservation(id)
  if txn.res[id] then return txn.res[id] end
  local s = redis.call('HGET', R, id)
  if not s then return nil end
  local r = decode(id, s)
  if r.status == HELD and r.expires and r.expires <= txn.now then expire(r) end
  return r
end

local function apply()
  local acc = txn.acc
  for _, id in ipairs(txn.order) do
    local r = txn.res[id]
    redis.call('HSET', R, id, encode(r))
    if r.status == HELD then
      redis.call('ZADD', X, num(r.expires), id)
    else
      redis.call('ZREM', X, id)
    end
  end
  for _, c in ipairs(txn.changes) do
    -- Exact trimming keeps the log's floor the same on every backend.
    redis.call('XADD', LOG, 'MAXLEN', retention, unpack(c))
  end
  if #txn.changes > 0 then
    redis.call('HSET', A, 'lim', num(acc.lim), 'com', num(acc.com), 'res', num(acc.res),
      'ovr', num(acc.ovr), 'act', num(acc.act), 'rev', num(acc.rev), 'st', num(acc.st),
      'cl', opt(acc.cl), 'dig', acc.dig)
    redis.call('SPUBLISH', BELL, num(acc.rev))
  end
  if acc.st == CLOSED then
    -- Closed runs age out; holds made before the close can still settle.
    for _, key in ipairs({A, R, X, LOG, P}) do
      redis.call('PEXPIRE', key, closed_retention_ms)
    end
  end
  return state(acc)
end

local function ok(...)
  local reply = {'OK'}
  for _, part in ipairs({...}) do
    if type(part) == 'table' then
      for _, v in ipairs(part) do reply[#reply + 1] = v end
    else
      reply[#reply + 1] = part
    end
  end
  return reply
end

local function err(reason, detail)
  return {'ERR', reason, detail or ''}
end

local function config(acc)
  return {num(acc.cr), opt(acc.cl), acc.lab, opt(acc.ttl), acc.lin, acc.pr, acc.ak, acc.us,
    acc.tm}
end

local ops = {}

-- ARGV 6..: limit, labels (canonical JSON), default ttl ms or "", then the
-- parent run, API key, user and team as given, the lineage (JSON) and its
-- number of parent scopes.
function ops.create()
  local lim, lab, ttl = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
  local pr, ak, us, tm, lin, np = ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14]
  if open_run() then
    local acc = txn.acc
    if acc.lim ~= lim or acc.lab ~= lab or acc.ttl ~= ttl or acc.pr ~= pr or acc.ak ~= ak
        or acc.us ~= us or acc.tm ~= tm then
      return err('RUN_ALREADY_EXISTS')
    end
    return ok('1', apply(), config(acc))
  end
  txn.now = now_ms()
  txn.acc = {lim = lim, com = 0, res = 0, ovr = 0, act = 0, rev = 0, st = OPEN, cr = txn.now,
    cl = nil, lab = lab, ttl = ttl, dig = '', lin = lin, pr = pr, ak = ak, us = us, tm = tm}
  redis.call('HSET', A, 'cr', num(txn.now), 'lab', lab, 'ttl', opt(ttl), 'pr', pr, 'ak', ak,
    'us', us, 'tm', tm, 'lin', lin, 'np', np)
  record(CREATED)
  return ok('0', apply(), config(txn.acc))
end

function ops.get()
  if not open_run() then return err('RUN_NOT_FOUND') end
  return ok(apply(), config(txn.acc))
end

-- ARGV 6..: how long a settlement may wait for its parents (ms). Replies the
-- number of holds released, the next time to look ("" if never), the lineage,
-- then each reservation whose parents waited longer: id, actual or "" (a refund).
function ops.expire()
  local wait = tonumber(ARGV[6])
  if not open_run() then
    redis.call('DEL', P)
    return ok('0', '')
  end
  local released = #txn.changes
  apply()
  local reply = {'OK', num(released), '', txn.acc.lin}
  local next_due = redis.call('ZRANGE', X, 0, 0, 'WITHSCORES')
  local next_settle = redis.call('ZRANGE', P, 0, 0, 'WITHSCORES')
  local soonest = tonumber(next_due[2])
  if next_settle[2] then
    local t = tonumber(next_settle[2]) + wait
    if not soonest or t < soonest then soonest = t end
  end
  reply[3] = opt(soonest)
  local stale = redis.call('ZRANGEBYSCORE', P, '-inf', num(txn.now - wait), 'LIMIT', 0, batch)
  for _, id in ipairs(stale) do
    local r = decode(id, redis.call('HGET', R, id))
    reply[#reply + 1] = id
    reply[#reply + 1] = r.status == RELEASED and '' or opt(r.actual)
  end
  return reply
end

-- A new reservation: held if the run is open and has room and no parent
-- blocked (`pb`: reason, scope, period), else blocked; the run's own verdict
-- takes precedence.
local function decide(id, amount, requested_ttl, ttl, pb)
  local acc = txn.acc
  local reason = WITHIN_BUDGET
  if acc.st == CLOSED then
    reason = RUN_CLOSED
  elseif acc.st == SUSPENDED then
    reason = RUN_SUSPENDED
  elseif acc.com + acc.res + amount > acc.lim then
    reason = INSUFFICIENT_BUDGET
  end
  local r = {id = id, amount = amount, requested_ttl = requested_ttl, status = BLOCKED,
    reason = reason, created = txn.now, held = 0, overrun = 0, scope = 'run:' .. acc.run,
    period = LIFETIME}
  if reason == WITHIN_BUDGET and pb then
    r.reason, r.scope, r.period = pb[1], pb[2], pb[3]
    put(r)
  elseif reason == WITHIN_BUDGET then
    r.scope, r.period = '', nil
    r.status = HELD
    r.held = amount
    r.expires = txn.now + ttl
    acc.res = acc.res + amount
    acc.act = acc.act + 1
    record(RESERVED, r, amount)
  else
    -- A block changes no money and no revision, but is remembered.
    put(r)
  end
  return r
end

local function decision(r)
  return {num(r.status == BLOCKED and BLOCK or ALLOW), num(r.reason), num(r.held),
    opt(r.expires), r.scope or '', opt(r.period)}
end

-- ARGV 6..: reservation id, amount, requested ttl ms or "", server default ttl
-- ms, run id, "1" when the caller runs the parent saga (or needs none), then
-- the block decided before the run (reason, scope, period) or three "", then
-- the request's fingerprint and pricing (or ""). A run with parents reserved
-- without the saga answers {"OK", "SAGA", lineage, default ttl} and writes nothing.
-- A retry is compared by fingerprint when there is one, else by amount.
function ops.reserve()
  local id, amount, requested_ttl = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
  local default_ttl, saga = tonumber(ARGV[9]), ARGV[11]
  local pb = nil
  if ARGV[12] ~= '' then pb = {tonumber(ARGV[12]), ARGV[13], tonumber(ARGV[14])} end
  if not open_run() then return err('RUN_NOT_FOUND') end
  local acc = txn.acc
  acc.run = ARGV[10]
  if acc.np > 0 and saga ~= '1' then return {'OK', 'SAGA', acc.lin, opt(acc.ttl)} end
  local fingerprint, pricing = ARGV[15], ARGV[16]
  local prev = reservation(id)
  if prev then
    local same = prev.fingerprint == fingerprint
    if fingerprint == '' and prev.fingerprint == '' then same = prev.amount == amount end
    if not same or prev.requested_ttl ~= requested_ttl then
      return err('IDEMPOTENCY_CONFLICT', 'reserved')
    end
    return ok('1', decision(prev), apply())
  end
  local r = decide(id, amount, requested_ttl, requested_ttl or acc.ttl or default_ttl, pb)
  r.fingerprint, r.pricing = fingerprint, pricing
  return ok('0', decision(r), apply())
end

-- The saga's step on an ancestor run. ARGV 6..: hold id, amount, ttl ms.
-- Replies replayed, status, reason; a missing ancestor blocks as closed.
function ops.child_hold()
  local id, amount, ttl = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
  if not open_run() then return {'OK', '0', num(BLOCKED), num(RUN_CLOSED)} end
  txn.acc.run = ARGV[9]
  local r = reservation(id)
  local replayed = r ~= nil
  if not r then r = decide(id, amount, ttl, ttl, nil) end
  apply()
  return {'OK', replayed and '1' or '0', num(r.status), num(r.reason)}
end

-- Settle a held or expired reservation with its actual cost; returns the overrun.
local function settle_commit(r, actual)
  local acc = txn.acc
  local late = r.status == EXPIRED
  local overrun
  if late then
    overrun = actual
    r.status = LATE_COMMITTED
  else
    overrun = math.max(0, actual - r.held)
    r.status = COMMITTED
    acc.res = acc.res - r.held
    acc.act = acc.act - 1
  end
  r.actual = actual
  r.overrun = overrun
  r.settled = txn.now
  acc.com = acc.com + actual
  acc.ovr = acc.ovr + overrun
  record(EV_COMMITTED, r, r.held, actual, overrun, late)
  return overrun
end

local function settle_release(r)
  local held = r.held
  r.status = RELEASED
  r.settled = txn.now
  txn.acc.res = txn.acc.res - held
  txn.acc.act = txn.acc.act - 1
  record(REFUNDED, r, held)
  return held
end

-- ARGV 6..: reservation id, actual. Replies end with the run's lineage.
function ops.commit()
  local id, actual = ARGV[6], tonumber(ARGV[7])
  if not open_run() then return err('RUN_NOT_FOUND') end
  local acc = txn.acc
  local r = reservation(id)
  if not r then return err('RESERVATION_NOT_FOUND') end
  if r.status == BLOCKED then return err('RESERVATION_BLOCKED') end
  if r.status == RELEASED then return err('RESERVATION_RELEASED') end
  if r.status == COMMITTED or r.status == LATE_COMMITTED then
    if r.actual ~= actual then return err('IDEMPOTENCY_CONFLICT', 'committed') end
    return ok('1', num(r.status), num(actual), num(r.held), num(r.overrun), apply(), acc.lin)
  end
  if acc.com + actual > MAX_MICROS then return err('TOTAL_OUT_OF_RANGE') end
  local overrun = settle_commit(r, actual)
  if acc.np > 0 then redis.call('ZADD', P, num(txn.now), id) end
  return ok('0', num(r.status), num(actual), num(r.held), num(overrun), apply(), acc.lin)
end

-- ARGV 6..: reservation id.
function ops.refund()
  local id = ARGV[6]
  if not open_run() then return err('RUN_NOT_FOUND') end
  local acc = txn.acc
  local r = reservation(id)
  if not r then return err('RESERVATION_NOT_FOUND') end
  if r.status == BLOCKED then return err('RESERVATION_BLOCKED') end
  if r.status ~= HELD then
    return ok('1', num(r.status), '0', apply(), acc.lin)
  end
  local held = settle_release(r)
  if acc.np > 0 then redis.call('ZADD', P, num(txn.now), id) end
  return ok('0', num(RELEASED), num(held), apply(), acc.lin)
end

-- The commit (or refund) saga's step on an ancestor run. ARGV 6..: hold id,
-- actual ("" releases). Idempotent; the descendant's record is the truth.
function ops.child_settle()
  local id, actual = ARGV[6], tonumber(ARGV[7])
  if not open_run() then return {'OK'} end
  local r = reservation(id)
  if not actual then
    if r and r.status == HELD then settle_release(r) end
  else
    if not r then
      r = {id = id, amount = 0, status = EXPIRED, reason = WITHIN_BUDGET, created = txn.now,
        held = 0, overrun = 0}
    end
    if (r.status == HELD or r.status == EXPIRED) and txn.acc.com + actual <= MAX_MICROS then
      settle_commit(r, actual)
    end
  end
  apply()
  return {'OK'}
end

-- The parents of these reservations are settled. ARGV 6..: reservation ids.
function ops.settled()
  redis.call('ZREM', P, unpack(ARGV, 6))
  return {'OK'}
end

-- The kill switch and its release: no new holds while suspended.
local function set_status(status, event)
  if not open_run() then return err('RUN_NOT_FOUND') end
  local acc = txn.acc
  if acc.st == CLOSED then return err('RUN_CLOSED') end
  if acc.st == status then return ok('1', apply()) end
  acc.st = status
  record(event)
  return ok('0', apply())
end

function ops.suspend()
  return set_status(SUSPENDED, EV_SUSPENDED)
end

function ops.resume()
  return set_status(OPEN, EV_RESUMED)
end

function ops.close()
  if not open_run() then return err('RUN_NOT_FOUND') end
  local acc = txn.acc
  if acc.st == CLOSED then return ok('1', apply()) end
  acc.st = CLOSED
  acc.cl = txn.now
  record(EV_CLOSED)
  return ok('0', apply())
end

-- ARGV 6..: after revision, limit. Read-only: the log's floor, the run's
-- revision, then up to `limit` entries after `after`, each as its id, then its fields.
function ops.read()
  local after, limit = tonumber(ARGV[6]), tonumber(ARGV[7])
  local rev = redis.call('HGET', A, 'rev')
  if not rev then return err('RUN_NOT_FOUND') end
  local first = redis.call('XRANGE', LOG, '-', '+', 'COUNT', 1)
  local floor = tonumber(rev) + 1
  if #first > 0 then floor = tonumber(string.match(first[1][1], '^(%d+)')) end
  local reply = {'OK', num(floor), rev}
  if limit > 0 then
    local entries = redis.call('XRANGE', LOG, num(after + 1) .. '-0', '+', 'COUNT', limit)
    for _, e in ipairs(entries) do
      reply[#reply + 1] = e[1]
      reply[#reply + 1] = e[2]
    end
  end
  return reply
end

local handler = ops[op]
if not handler then return err('UNKNOWN_OPERATION', op) end
return handler()
